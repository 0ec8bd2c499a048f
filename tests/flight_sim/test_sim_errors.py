"""flight_sim/errors.py: the one registry of the simulator's errors, each an EoedgeError with a
code that keeps its builtin base and stays importable where it used to live."""
import re

import pytest

from flight_sim import daemon_proc, errors, runner, scenario, scenes, uplink
from shared.errors import EXIT_ERROR, EoedgeError

REGISTRY = {
    errors.ScenarioError: ("bad_scenario", ValueError, scenario),
    errors.SceneSpecError: ("bad_scene", ValueError, scenes),
    errors.ScenarioFailed: ("scenario_failed", RuntimeError, runner),
    errors.DaemonStartError: ("daemon_start_failed", RuntimeError, daemon_proc),
    errors.UplinkInterrupted: ("uplink_interrupted", RuntimeError, uplink),
}


@pytest.mark.parametrize("cls", list(REGISTRY), ids=lambda c: c.__name__)
def test_each_error_has_a_code_its_old_base_and_its_old_home(cls):
    code, base, old_module = REGISTRY[cls]
    assert issubclass(cls, errors.FlightSimError) and issubclass(cls, EoedgeError)
    assert issubclass(cls, base)
    assert cls.code == code and re.fullmatch(r"[a-z]+(_[a-z]+)*", code)
    assert cls.exit_code == EXIT_ERROR
    assert getattr(old_module, cls.__name__) is cls


def test_codes_are_unique_and_every_error_class_is_listed():
    defined = {v for v in vars(errors).values()
               if isinstance(v, type) and issubclass(v, errors.FlightSimError) and v is not errors.FlightSimError}
    assert defined == set(REGISTRY)
    assert len({cls.code for cls in defined}) == len(defined)


def test_an_error_says_its_code_and_message():
    exc = errors.UplinkInterrupted("up-1", 3)
    assert exc.as_dict() == {"code": "uplink_interrupted", "message": "uplink of up-1 interrupted after 3 chunks"}
    assert (exc.upload_id, exc.sent) == ("up-1", 3)
    with pytest.raises(ValueError, match="scenes\\[0\\].kind"):      # old `except ValueError` still works
        scenes.open_source({"kind": "painted"})
