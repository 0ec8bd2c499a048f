"""The search engine: an Optuna multi-objective study (maximise mIoU, minimise ms per tile, bytes
as a constraint) in Optuna storage, worked by any number of processes.

Optuna because it is the field's hyper-parameter/NAS engine: NSGA-II (the evolutionary search of
the deployment-aligned NAS studies) and its other samplers behind one interface, and storages
that let workers share a study.

The size budget is a constraint (`SIZE`, set by the objective with trial.set_constraint): the
samplers that honour constraints (NSGA-II/III, TPE, GP) prefer feasible candidates.

Storage: a journal file by default (JournalStorage + JournalFileBackend: an append-only log under
a file lock; embedded, no server; a process killed with kill -9 loses only the trial it was
running: `recover` marks that trial failed and queues its architecture again), which the worker
processes of one machine share; an RDB URL (e.g. postgresql://user:pass@host/db) lets workers on
many machines join the same study. Trials are claimed by host and process id (Optuna's heartbeat
needs Study.optimize, and the workers here ask and tell): a trial a dead process left running is
recovered when a worker next starts on its machine."""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from ground.errors import GroundError, StageError

SAMPLERS = {
    "nsga2": lambda seed, pop: optuna.samplers.NSGAIISampler(population_size=pop, seed=seed),
    "nsga3": lambda seed, pop: optuna.samplers.NSGAIIISampler(population_size=pop, seed=seed),
    "tpe": lambda seed, pop: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "gp": lambda seed, pop: optuna.samplers.GPSampler(seed=seed),
    "random": lambda seed, pop: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda seed, pop: optuna.samplers.QMCSampler(seed=seed),
}
DIRECTIONS = ("maximize", "minimize")          # mIoU, ms per tile
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SIZE = "ir_bytes_over_budget"                  # the constraint (trial.set_constraint): <= 0 fits
LOCK_GRACE_S = 5
UNCLAIMED_S = 60       # a trial is claimed (user attr "worker") within milliseconds of being asked for


def storage(spec: str | Path):
    """An RDB URL (anything with '://') or the path of a journal file."""
    spec = str(spec)
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    # a journal write holds the lock for milliseconds: one held 5 s is a killed process's, released
    lock = optuna.storages.journal.JournalFileSymlinkLock(spec, grace_period=LOCK_GRACE_S)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(spec, lock_obj=lock))


def open_study(store, name: str, sampler: str = "nsga2", seed: int = 0, population: int = 8) -> optuna.Study:
    """The study `name` in `store` (created if new, joined if it exists)."""
    if sampler not in SAMPLERS:
        raise StageError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=store, directions=list(DIRECTIONS), load_if_exists=True,
                               sampler=SAMPLERS[sampler](seed, population))


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True                    # another machine's: recovered when a worker starts there
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def recover(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a dead process of this machine (kill -9): marked failed, the genes
    they had drawn queued again (the rest is drawn anew). Returns their numbers."""
    now = datetime.datetime.now()
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if (not _alive(t.user_attrs["worker"]) if t.user_attrs.get("worker") else
                 (now - t.datetime_start).total_seconds() > UNCLAIMED_S)]      # its asker died before claiming it
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return [t.number for t in stale]


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def work(study: optuna.Study, evaluate: Callable[[optuna.Trial], tuple[float, float]], n_trials: int,
         log: Callable[[str], None] = lambda m: None) -> list[int]:
    """Run trials until the study holds `n_trials` finished ones (completed or pruned), between
    however many workers share it. A trial is run by the worker that asked for it, once: a trial
    whose number comes after `n_trials` trials already finished or running is not run (marked
    failed as surplus). Returns the numbers this worker ran."""
    me, ran = worker_id(), []
    for n in recover(study):
        log(f"trial {n} was left running by a dead worker: failed, queued again")
    while len(finished(study)) < n_trials:
        trial = study.ask()
        trial.set_user_attr("worker", me)
        ahead = [t for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
                 if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            values = evaluate(trial)
        except optuna.TrialPruned as exc:
            study.tell(trial, state=TrialState.PRUNED)
            log(f"trial {trial.number} pruned: {exc}")
        except GroundError as exc:           # this candidate cannot be built, exported or timed
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            log(f"trial {trial.number} failed: {exc}")
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, list(values))
        ran.append(trial.number)
    return ran
