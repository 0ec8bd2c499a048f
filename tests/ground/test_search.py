"""Architecture search: the searchable student, the validation split, the early stop, the front,
and the study in Optuna storage: a search killed with kill -9 resumes from its journal with its
finished trials; worker processes on one journal finish N trials between them, none run twice."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch

from conftest import REPO
from mini_run import host_precision, make_run
from ground.compression.pruning.plan import prune_to_target
from ground.models.checkpoints import build_arch, load_model
from ground.openvino.export import export_openvino
from ground.openvino.runtime import parity
from ground.search.front import pareto, pick
from ground.search.objectives import dominated, validation_split
from ground.search.space import arch_key, arch_of, suggest
from ground.search.study import FINISHED, open_study, storage, work
from ground.stages.run import Run

OPTIONS = {"widths": [8, 12, 16], "separable": [False, True, True], "kernels": [3, 5, 3], "upsample": "transpose",
           "skip": "add", "activation": "hardswish"}


def test_search_unet_exports_prunes_and_reloads(tmp_path):
    """Every choice of the family is a checkpoint's arch: OpenVINO runs it like torch, torch-pruning
    prunes through its added skips."""
    torch.manual_seed(0)
    model = build_arch(arch_of(OPTIONS, 6, 3)).eval()
    x = torch.randn(2, 6, 64, 64)
    res = export_openvino(model, tmp_path / "ir", tile=64)
    assert parity(res.xml, model, x.numpy(), with_fp16=False)["max_abs_diff"] < 1e-3
    pruned = prune_to_target(model, x[:1], "lamp", 0.3, round_to=4).model
    assert pruned(x).shape == (2, 3, 64, 64)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_space_draws_used_genes_only_into_the_architecture():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    keys = set()
    for _ in range(20):
        options = suggest(study.ask())
        n = len(options["widths"])
        assert 3 <= n <= 5 and len(options["separable"]) == n == len(options["kernels"])
        build_arch(arch_of(options, 6, 3))(torch.zeros(1, 6, 32, 32))
        keys.add(arch_key(arch_of(options, 6, 3)))
    assert len(keys) > 10


def test_validation_split_holds_out_training_rows_never_the_eval(tmp_path):
    run = Run.open(make_run(tmp_path), progress=False)
    calls = []

    def teacher(sample):
        calls.append(sample.name)
        return np.stack([np.full(sample.image.shape[1:], 0.2), np.full(sample.image.shape[1:], 0.7),
                         np.full(sample.image.shape[1:], 0.1)]).astype(np.float32)
    data, kind, probs = validation_split(run.data, teacher, fraction=0.25, min_rows=128)
    assert kind == "teacher" and len(data.evals) == 2
    eval_digests = {s.digest() for s in run.data.evals}
    for train, val in zip(data.unlabelled, data.evals):
        assert train.image.shape[1] + val.image.shape[1] == 128 and val.image.shape[1] == 32
        assert (val.labels == 1).all()                    # the teacher's argmax on the strip
        assert val.digest() not in eval_digests and train.digest() not in eval_digests
    assert not data.labelled and all(p.shape == (3, 32, 256) for p in probs)


def test_a_candidate_is_hopeless_only_when_a_faster_one_learns_clearly_better():
    done = [{"number": i, "probe_loss": 1.0 + i, "ms_per_tile": 5.0 + i} for i in range(4)]
    assert dominated(0.9, 6.0, done) is None                     # best loss so far
    assert dominated(1.5, 6.0, done) == 0                        # trial 0: faster and lower loss
    assert dominated(1.5, 4.0, done) is None                     # nobody is as fast
    assert dominated(1.5, 6.0, done[:3]) is None                 # too few finished to judge


def test_front_and_pick():
    rows = [{"number": i, "miou": m, "ms_per_tile": t, "feasible": f, "duplicate_of": None}
            for i, (m, t, f) in enumerate([(0.80, 10, True), (0.78, 4, True), (0.70, 5, True), (0.9, 1, False),
                                           (0.79, 6, True)])]
    front = pareto(rows)
    assert [r["number"] for r in front] == [1, 4, 0]            # 2 is beaten by 1; 3 is over the size budget
    assert pick(front, 0.80, 0.015)["number"] == 4               # fastest within 0.015 of the reference
    assert pick(front, 0.80, 0.05)["number"] == 1
    assert pick(front, 0.80, 0.05, budget_ms=3) is None


def _toy_worker(path, n, out, start):
    """A worker process on the journal: trials are cheap, each appended to this worker's file."""
    study = open_study(storage(path), "toy", "random", seed=os.getpid())
    start.wait(120)                        # both begin together, whatever their import times

    def evaluate(trial):
        x = trial.suggest_float("x", 0, 1)
        with open(out, "a") as f:
            f.write(f"{trial.number}\n")
        time.sleep(0.2)
        return x, 1 - x
    work(study, evaluate, n)


def test_two_worker_processes_finish_n_trials_between_them_none_twice(tmp_path):
    n, journal = 12, tmp_path / "study.journal"
    open_study(storage(journal), "toy", "random")               # created once, joined by both
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{i}.txt" for i in range(2)]
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_toy_worker, args=(str(journal), n, str(o), start)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    ran = [[int(x) for x in o.read_text().split()] if o.exists() else [] for o in outs]
    study = optuna.load_study(study_name="toy", storage=storage(journal))
    done = study.get_trials(states=FINISHED)
    assert len(done) == n
    assert all(ran) and not set(ran[0]) & set(ran[1])          # both worked; no trial by both
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in done)    # each finished trial run exactly once
    assert len({t.user_attrs["worker"] for t in done}) == 2


def test_an_rdb_url_is_a_storage_workers_share(tmp_path):
    """An RDB URL (PostgreSQL across machines; SQLite here) holds the same study as a journal."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert isinstance(storage(url), optuna.storages.RDBStorage)
    for _ in range(2):                                          # two workers in turn: 3 trials in all
        study = open_study(storage(url), "rdb", "tpe")
        work(study, lambda t: (t.suggest_float("x", 0, 1), 0.5), 3)
    assert len(optuna.load_study(study_name="rdb", storage=url).get_trials(states=FINISHED)) == 3


def _search(run_dir, *args, as_json=True):
    return subprocess.Popen([sys.executable, "-m", "eoedge", "ground", "search", str(run_dir), "--steps", "2",
                             "--population", "4", "--precision", host_precision(),
                             *(["--json"] if as_json else []), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _trials(run_dir, name="search"):
    journal = run_dir / "search" / name / "study.journal"
    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name=name, storage=storage(journal)).get_trials()
    except KeyError:        # the study is not written yet
        return []


def test_a_search_killed_with_kill_9_resumes_with_its_finished_trials(tmp_path):
    run_dir = make_run(tmp_path)
    proc = _search(run_dir, "--trials", "4")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        trials = _trials(run_dir)
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 1 and \
                any(t.state == optuna.trial.TrialState.RUNNING and "options" in t.user_attrs for t in trials):
            break                                                # killed while training a candidate
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)                          # mid-trial, no cleanup
    proc.wait()
    before = {t.number: t.values for t in _trials(run_dir) if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t for t in _trials(run_dir) if t.state == optuna.trial.TrialState.RUNNING]
    assert before and running

    resumed = _search(run_dir, "--trials", "4")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    after = {t.number: t for t in _trials(run_dir)}
    for number, values in before.items():                       # nothing finished was lost or redone
        assert after[number].state == optuna.trial.TrialState.COMPLETE and after[number].values == values
    for t in running:                                           # the killed trial: failed, its architecture again
        assert after[t.number].state == optuna.trial.TrialState.FAIL
        assert any(a.user_attrs.get("retry_of") == t.number and all(a.params[k] == v for k, v in t.params.items())
                   for a in after.values())
    assert sum(t.state in FINISHED for t in after.values()) == 4
    report = json.loads(out)
    assert report["finished"] == 4 and report["front"]
    model, _, meta = load_model(run_dir / report["front"][0]["checkpoint"])
    assert meta["arch"]["name"] == "search-unet"


def test_search_command_with_two_workers_and_a_pick(tmp_path):
    run_dir = make_run(tmp_path)
    proc = _search(run_dir, "--trials", "4", "--workers", "2", "--pick", "1.0")
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    done = [t for t in _trials(run_dir) if t.state in FINISHED]
    assert report["finished"] == len(done) == 4
    assert report["picked"]["picked"] == "search/search/picked.pt" and (run_dir / "search/search/picked.pt").exists()
    for name in ("front.json", "front.md", "front.png"):
        assert (run_dir / "search" / "search" / name).stat().st_size > 0


def test_an_unknown_device_is_refused_in_one_line(tmp_path):
    run_dir = make_run(tmp_path)
    proc = _search(run_dir, "--device", "MYRIAD", "--trials", "1", as_json=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("error: --device MYRIAD")
    assert "Traceback" not in err
