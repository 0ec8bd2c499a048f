"""The `eoedge` entry point: lazy groups, a lean on-board side, and a clear word on missing extras."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_onboard_import_and_help_leave_torch_and_ground_out():
    out = run_py("""
        import importlib, json, pkgutil, sys
        import onboard
        for m in pkgutil.walk_packages(onboard.__path__, "onboard."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
        from eoedge.cli import main
        try:
            main(["onboard", "--help"])
        except SystemExit:
            pass
        loaded = sorted(m for m in ("torch", "ground", "flight_sim", "torchvision") if m in sys.modules)
        print(json.dumps(loaded))
    """)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "usage" in out.stdout.lower()


def test_top_level_help_lists_every_group():
    out = subprocess.run([sys.executable, "-m", "eoedge", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0
    for group in ("shared", "ground", "onboard", "sim", "demo"):
        assert group in out.stdout


def test_unknown_group_is_named():
    out = subprocess.run([sys.executable, "-m", "eoedge", "grund"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2
    assert "unknown group 'grund'" in out.stderr


def test_missing_extra_is_named_not_a_traceback():
    # Hide torch as an onboard-only install would, then ask for a ground command.
    out = run_py("""
        import sys
        from importlib.abc import MetaPathFinder

        class NoTorch(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "segmentation_models_pytorch"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())
        from eoedge.cli import main
        sys.exit(main(["ground", "size", "--params", "100k"]))
    """)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "needs the 'ground' extra" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_extra_under_json_is_one_json_object():
    out = run_py("""
        import sys
        from importlib.abc import MetaPathFinder

        class NoTorch(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoTorch())
        from eoedge.cli import main
        sys.exit(main(["ground", "size", "--params", "100k", "--json"]))
    """)
    assert out.returncode == 3 and out.stderr == "", out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "missing_extra"


# One bad input per CLI: (arguments after `eoedge`, exit code, error code).
BAD_INPUTS = [
    (["grund"], 2, "usage"),
    (["shared", "bundle", "inspect", "/no/such/bundle.tar"], 1, "not_a_bundle"),
    (["shared", "bundle", "build", "--manifest", "m.json", "--file", "a=b", "--key", "k",
      "--out", "o.tar", "--max-bytes", "5M"], 2, "usage"),
    (["ground", "size", "--params", "lots"], 1, "ground_error"),
    (["onboard", "status", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.2", "--retries", "0"],
     4, "unreachable"),
    (["onboard", "command", "status", "--args", "[1]", "--endpoint", "tcp://127.0.0.1:9"], 1,
     "invalid_input"),
    (["sim", "generate", "--out", "scene.png"], 1, "invalid_input"),
    (["sim", "run", "/no/such/scenario.toml"], 1, "file_not_found"),
]


@pytest.mark.parametrize("argv, exit_code, code", BAD_INPUTS, ids=[" ".join(a[:2]) for a, _, _ in BAD_INPUTS])
def test_every_cli_refuses_bad_input_in_one_line_or_one_json_object(tmp_path, argv, exit_code, code):
    """The one error policy (docs/cli.md): `error: <message> [<code>]` on stderr and the
    documented exit code, or under --json one JSON object on stdout; never a traceback."""
    def eoedge(*extra):
        return subprocess.run([sys.executable, "-m", "eoedge", *argv, *extra], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})

    human = eoedge()
    assert human.returncode == exit_code, human.stderr
    assert human.stdout == "" and human.stderr.count("\n") == 1, human.stderr
    assert human.stderr.startswith("error: ") and human.stderr.rstrip().endswith(f"[{code}]")
    machine = eoedge("--json")
    assert machine.returncode == exit_code and "Traceback" not in machine.stderr, machine.stderr
    doc = json.loads(machine.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == code
    assert doc["error"]["message"] == human.stderr[len("error: "):-len(f" [{code}]\n")]
