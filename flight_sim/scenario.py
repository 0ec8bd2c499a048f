"""A scenario: one TOML file says what to fly, how, and what to break.

    name = "quick"
    [bundle]    path, public_key (relative to the file), chunk_size; private_key (optional: lets
                the corrupt-bundle fault corrupt a newer, properly signed version)
    [daemon]    max_frames, max_pending_products, telemetry_interval_s, device, num_requests,
                transport ("ipc" | "tcp"), start_timeout_s, log_level; watchdog_s (> 0: the
                simulator plays systemd with that WatchdogSec), frame_deadline_s, spill (default
                true: kept products on the daemon's disk before their DECISION, until the
                ground acknowledges them); test_frame_delay_s (TESTS ONLY: every frame waits
                that long in the daemon before its pipeline, a slowed daemon)
    [camera]    frame_lines, gsd_m, ground_speed_m_s, dtype ("uint16" | "float32"), bands,
                mode ("realtime" | "asap"), speedup, gap_s
    [payload]   window, retry_s, ack_timeout_s, outcome_timeout_s
    [[scenes]]  one table per scene (flight_sim.scenes.open_source; its keys are checked here,
                its values when the scene opens)
    [[uplinks]] path, after_pass = N (0-based, as the report's passes), public_key (default the
                bundle's): a newer bundle uplinked to the running daemon once pass N is over;
                frames acquired after that pass's end wait for it and run on it
    [downlink]  passes = [{start_s, duration_s, rate_mbps | budget_bytes}] or periodic:
                first_pass_s, pass_every_s, pass_duration_s, rate_mbps | budget_bytes,
                passes_after_end; learning samples' own budget per pass: learning_budget_bytes
                or learning_rate_mbps (default 0: none go down)
    [faults]    kill_daemon_after_frames = [N, ...], restart_after_s, unsigned_bundle,
                corrupt_bundle, corrupt_chunks = [i, ...], interrupt_uplink_after_chunks,
                malformed = ["band_count", ...], malformed_every, burst = {after_frames, frames},
                products_link_down_after_frames (the simulator stops pulling products until the
                next restart: kept products die with a killed daemon unless it spilled them);
                the soak's (flight_sim.soak): kill_every_s, sigstop_at_s = [t, ...], disk_mb,
                fill_disk_at_s, fill_disk_for_s, corrupt_state_at_s = [t, ...]
    [report]    targets (model classes whose true pixels are the value), mask_examples,
                sample_every_s (the daemon's RSS and fds), previews (keep each frame's preview)
    [run]       timeout_s; clock ("simulated": the orbit's cadence and the daemon's measured
                processing time drive passes and budgets, flight_sim.clock; "wall": the wall
                clock scaled by camera.speedup, for soaks)

`load_scenario(path)` checks every key (unknown keys are errors: a typo must not silently
turn a fault off) and raises `ScenarioError` naming the file and the field.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flight_sim.camera import DTYPES, MODES
from flight_sim.downlink import passes_from_spec
from flight_sim.errors import ScenarioError, SceneSpecError
from flight_sim.payload import MALFORMED_KINDS
from flight_sim.scenes import check_scene_spec

__all__ = ["SCHEMA", "Scenario", "ScenarioError", "load_scenario", "scenario_from_dict"]


def _num(lo: float | None = None, integer: bool = False, lo_open: bool = False):
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool):
            return "an integer" if integer else "a number"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"{'>' if lo_open else '>='} {lo}"
        return None
    return check


def _choice(*options):
    def check(v: Any) -> str | None:
        return None if v in options else f"one of {', '.join(map(str, options))}"
    return check


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "a non-empty string"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _int_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    return None if ok else "a list of integers >= 0"


def _num_list(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(i, (int, float)) and not isinstance(i, bool) and i >= 0
                                     for i in v)
    return None if ok else "a list of numbers >= 0"


def _str_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(i, str) for i in v) else "a list of strings"


def _malformed(v: Any) -> str | None:
    if _str_list(v) or any(k not in MALFORMED_KINDS for k in v):
        return f"a list of: {', '.join(MALFORMED_KINDS)}"
    return None


def _burst(v: Any) -> str | None:
    if not isinstance(v, dict) or set(v) - {"after_frames", "frames"} or \
            any(not isinstance(v.get(k), int) or v.get(k) < 0 for k in ("after_frames", "frames")):
        return "a table {after_frames = N, frames = M}"
    return None


def _anything(v: Any) -> str | None:
    return None


# section -> key -> (check, default)
SCHEMA: dict[str, dict[str, tuple]] = {
    "bundle": {"path": (_str, None), "public_key": (_str, None), "private_key": (_str, None),
               "chunk_size": (_num(1, integer=True), 256 * 1024)},
    "daemon": {"max_frames": (_num(1, integer=True), 4),
               "max_pending_products": (_num(1, integer=True), 32),
               "telemetry_interval_s": (_num(0, lo_open=True), 0.5),
               "device": (_str, "CPU"), "num_requests": (_num(0, integer=True), 0),
               "transport": (_choice("ipc", "tcp"), "ipc"),
               "start_timeout_s": (_num(0, lo_open=True), 120.0),
               "log_level": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
               "watchdog_s": (_num(0), 0), "frame_deadline_s": (_num(0, lo_open=True), None),
               "spill": (_bool, True), "test_frame_delay_s": (_num(0), 0.0)},
    "camera": {"frame_lines": (_num(1, integer=True), 512), "gsd_m": (_num(0, lo_open=True), 10.0),
               "ground_speed_m_s": (_num(0, lo_open=True), 7500.0), "dtype": (_choice(*DTYPES), "uint16"),
               "bands": (_str_list, None), "mode": (_choice(*MODES), "asap"),
               "speedup": (_num(0, lo_open=True), 1.0), "gap_s": (_num(0), 0.0)},
    "payload": {"window": (_num(1, integer=True), 6), "retry_s": (_num(0, lo_open=True), 0.25),
                "ack_timeout_s": (_num(0, lo_open=True), 10.0),
                "outcome_timeout_s": (_num(0, lo_open=True), 300.0)},
    "downlink": {"passes": (_anything, None), "first_pass_s": (_num(0), None),
                 "pass_every_s": (_num(0, lo_open=True), None),
                 "pass_duration_s": (_num(0, lo_open=True), None),
                 "rate_mbps": (_num(0, lo_open=True), None), "budget_bytes": (_num(0, integer=True), None),
                 "passes_after_end": (_num(0, integer=True), None),
                 "learning_budget_bytes": (_num(0, integer=True), None),
                 "learning_rate_mbps": (_num(0), None)},
    "faults": {"kill_daemon_after_frames": (_int_list, []), "restart_after_s": (_num(0), 0.5),
               "unsigned_bundle": (_bool, False), "corrupt_bundle": (_bool, False),
               "corrupt_chunks": (_int_list, []), "interrupt_uplink_after_chunks": (_num(1, integer=True), None),
               "malformed": (_malformed, []), "malformed_every": (_num(1, integer=True), 3),
               "burst": (_burst, None),
               "products_link_down_after_frames": (_num(0, integer=True), None),
               "kill_every_s": (_num(0, lo_open=True), None), "sigstop_at_s": (_num_list, []),
               "disk_mb": (_num(1, integer=True), None), "fill_disk_at_s": (_num(0), None),
               "fill_disk_for_s": (_num(0, lo_open=True), 60.0),
               "corrupt_state_at_s": (_num_list, [])},
    "report": {"targets": (_str_list, None), "mask_examples": (_num(0, integer=True), 4),
               "sample_every_s": (_num(0, lo_open=True), 5.0), "previews": (_bool, True)},
    "run": {"timeout_s": (_num(0, lo_open=True), 900.0),
            "clock": (_choice("simulated", "wall"), "simulated")},
}
TOP_LEVEL = {"name", "description", "scenes", "uplinks"}
# one [[uplinks]] table: a newer bundle uplinked to the running daemon after pass `after_pass`
UPLINK_KEYS: dict[str, tuple] = {"path": (_str, None), "public_key": (_str, None),
                                 "after_pass": (_num(0, integer=True), None)}


@dataclass
class Scenario:
    name: str
    description: str
    base_dir: Path
    sections: dict[str, dict]
    scenes: list[dict]
    source_file: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __getattr__(self, item: str) -> dict:
        sections = self.__dict__.get("sections", {})
        if item in sections:
            return sections[item]
        raise AttributeError(item)

    def path(self, section: str, key: str) -> Path | None:
        value = self.sections[section].get(key)
        return None if value is None else (self.base_dir / value).expanduser().resolve()


def scenario_from_dict(doc: dict, base_dir: Path, where: str = "<scenario>") -> Scenario:
    unknown = set(doc) - TOP_LEVEL - set(SCHEMA)
    if unknown:
        raise ScenarioError(f"{where}: unknown key or section {sorted(unknown)[0]!r} "
                            f"(known: {', '.join(sorted(TOP_LEVEL | set(SCHEMA)))})")
    sections: dict[str, dict] = {}
    for section, keys in SCHEMA.items():
        given = doc.get(section, {})
        if not isinstance(given, dict):
            raise ScenarioError(f"{where}: [{section}] must be a table")
        for key in given:
            if key not in keys:
                raise ScenarioError(f"{where}: {section}.{key}: unknown key (known: {', '.join(keys)})")
        values = {}
        for key, (check, default) in keys.items():
            if key in given:
                problem = check(given[key])
                if problem:
                    raise ScenarioError(f"{where}: {section}.{key}: must be {problem}, got {given[key]!r}")
                values[key] = given[key]
            elif default is not None:
                values[key] = default
        sections[section] = values
    for key in ("path", "public_key"):
        if key not in sections["bundle"]:
            raise ScenarioError(f"{where}: bundle.{key}: missing (the bundle to uplink and the "
                                f"key the daemon checks it with)")
    scenes = doc.get("scenes")
    if not isinstance(scenes, list) or not scenes or not all(isinstance(s, dict) for s in scenes):
        raise ScenarioError(f"{where}: scenes: at least one [[scenes]] table expected")
    for i, spec in enumerate(scenes):
        try:
            check_scene_spec(spec, f"scenes[{i}]")
        except SceneSpecError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
    sections["uplinks"] = _uplinks(doc.get("uplinks", []), where)
    try:
        passes_from_spec(sections["downlink"], 0.0)     # the pass timeline's fields, checked now
    except ScenarioError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    name = doc.get("name", Path(where).stem)
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{where}: name: a non-empty string expected")
    return Scenario(name, str(doc.get("description", "")), Path(base_dir), sections, scenes, raw=doc)


def _uplinks(value: Any, where: str) -> list[dict]:
    """The [[uplinks]] tables, checked: {path, after_pass, public_key (default: the bundle's)}."""
    if not isinstance(value, list) or not all(isinstance(u, dict) for u in value):
        raise ScenarioError(f"{where}: uplinks: [[uplinks]] tables {{path, after_pass}} expected")
    out = []
    for i, given in enumerate(value):
        for key in given:
            if key not in UPLINK_KEYS:
                raise ScenarioError(f"{where}: uplinks[{i}].{key}: unknown key (known: {', '.join(UPLINK_KEYS)})")
        for key, (check, _) in UPLINK_KEYS.items():
            if key not in given:
                if key != "public_key":
                    raise ScenarioError(f"{where}: uplinks[{i}].{key}: missing")
                continue
            problem = check(given[key])
            if problem:
                raise ScenarioError(f"{where}: uplinks[{i}].{key}: must be {problem}, got {given[key]!r}")
        out.append(dict(given))
    return sorted(out, key=lambda u: u["after_pass"])


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"scenario file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    scenario = scenario_from_dict(doc, path.resolve().parent, str(path))
    scenario.source_file = path.resolve()
    return scenario
