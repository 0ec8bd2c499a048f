"""The `eoedge` entry point: lazy groups, a lean on-board side, and a clear word on missing extras."""
import json
import subprocess
import sys
import textwrap

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
