"""Downlink: products wait on board in a priority queue; ground-station passes take what fits.

The daemon PUSHes a PRODUCT for every kept frame; `Downlink.receive` pulls it into on-board
storage at once (so the daemon never blocks on us): the message as it came, written to a file in
the queue folder (the satellite's mass memory; the simulator's memory holds only its body and
tile boxes), with the mission time at which it was ready, or none yet (`set_ready` gives it once
the simulated clock knows it; until then it waits for every pass). Passes lie on a timeline (`Pass(start_s, duration_s, budget_bytes)`, mission seconds); when the
mission clock passes the end of a pass, `advance(t)` plays it: the products ready before the pass
ends go down in priority order (smaller number first, then oldest), each as its encoded size,
while the pass's byte budget lasts. A product bigger than what is left waits for the next pass,
and smaller ones behind it may still go (no head-of-line blocking). What goes down, the
`GroundStation` writes to disk: one folder per product with its body (product.json), the class
mask PNG (and a model chain's later steps' masks, mask_<step>.png), the quicklook JPEG, the kept
tiles or whole frame and their boxes (.npy).

Learning samples (SAMPLE messages, shared.samples: raw model-band tiles the daemon's model was
unsure of, or drawn at random) wait in a queue of their own, one file per sample (each re-encoded
as a one-sample SAMPLE message: what it costs on the link), and go down within a budget of their
own per pass (`Pass.learning_budget_bytes`; 0, the default: samples never go down and are
reported as left on board), by priority (smaller first), then the higher entropy, then the
older; the science products' budget is never touched by them. The station writes each one with
shared.samples.write_sample into <out>/learning/, the folder the factory's `learning` source
reads.
"""
from __future__ import annotations

import heapq
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import msgpack
import numpy as np

from flight_sim.catalog import Catalogue, check_catalog, product_item
from flight_sim.errors import ScenarioError
from flight_sim.products_gis import write_gis
from shared.messages import Limits, Message, MessageError, decode, encode
from shared.samples import LearningSample, SampleError, samples_from_message, write_sample

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEPT_AFTER_DOWNLINK = ("mask_png", "tile_boxes")   # and a chain's step masks (mask_<step>)
KEPT_ON_RECEIPT = ("tile_boxes",)      # in memory while the product waits on disk (the report's)
NOT_READY = float("inf")               # a product whose ready time the clock does not know yet
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Pass:
    start_s: float
    duration_s: float
    budget_bytes: int                  # the science products'
    station: str = "ground"
    learning_budget_bytes: int = 0     # the learning samples' own

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


LEARNING_KEYS = ("learning_budget_bytes", "learning_rate_mbps")
PASS_KEYS = {"start_s", "duration_s", "rate_mbps", "budget_bytes", "station", *LEARNING_KEYS}


def _learning_budget(p: dict, duration_s: float, where: str) -> int:
    """A pass's learning budget: `learning_budget_bytes`, or `learning_rate_mbps` over the pass."""
    for key in LEARNING_KEYS:
        v = p.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise ScenarioError(f"{where}.{key}: a number >= 0 expected, got {v!r}")
    if p.get("learning_budget_bytes") is not None and p.get("learning_rate_mbps") is not None:
        raise ScenarioError(f"{where}: give learning_budget_bytes or learning_rate_mbps, not both")
    if p.get("learning_budget_bytes") is not None:
        return int(p["learning_budget_bytes"])
    if p.get("learning_rate_mbps") is not None:
        return int(float(p["learning_rate_mbps"]) * 1e6 / 8 * duration_s)
    return 0


def passes_from_spec(spec: dict, until_s: float) -> list[Pass]:
    """The pass timeline of a scenario's [downlink] table: an explicit `passes` list of
    {start_s, duration_s, rate_mbps | budget_bytes}, or a periodic one from `first_pass_s`,
    `pass_every_s`, `pass_duration_s`, `rate_mbps`, `passes_after_end`. The learning samples'
    own budget per pass: `learning_budget_bytes` or `learning_rate_mbps` (the table's, or a
    `passes` entry's own; default 0: none go down).

    Periodic passes cover `until_s` (the end of acquisition) and `passes_after_end` more."""
    def budget(p: dict, where: str) -> int:
        if "budget_bytes" in p:
            return int(p["budget_bytes"])
        if "rate_mbps" in p:
            return int(float(p["rate_mbps"]) * 1e6 / 8 * float(p["duration_s"]))
        raise ScenarioError(f"{where}: give rate_mbps or budget_bytes")

    table_learning = {k: spec[k] for k in LEARNING_KEYS if spec.get(k) is not None}

    out = []
    if "passes" in spec:
        if not isinstance(spec["passes"], list):
            raise ScenarioError("downlink.passes: a list of {start_s, duration_s, rate_mbps} expected")
        for i, p in enumerate(spec["passes"]):
            where = f"downlink.passes[{i}]"
            if not isinstance(p, dict):
                raise ScenarioError(f"{where}: a table {{start_s, duration_s, rate_mbps}} expected, "
                                    f"got {p!r}")
            unknown = sorted(set(p) - PASS_KEYS)
            if unknown:
                raise ScenarioError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(PASS_KEYS))})")
            for key in ("start_s", "duration_s"):
                if not isinstance(p.get(key), (int, float)) or p[key] < 0:
                    raise ScenarioError(f"{where}.{key}: a number >= 0 expected, got {p.get(key)!r}")
            own = {k: p[k] for k in LEARNING_KEYS if k in p}
            learning = _learning_budget(own or table_learning, float(p["duration_s"]), where)
            out.append(Pass(float(p["start_s"]), float(p["duration_s"]), budget(p, where),
                            str(p.get("station", "ground")), learning))
    else:
        every = float(spec.get("pass_every_s", 60.0))
        duration = float(spec.get("pass_duration_s", 10.0))
        first = float(spec.get("first_pass_s", every))
        after = int(spec.get("passes_after_end", 3))
        if every <= 0 or duration <= 0 or duration > every:
            raise ScenarioError("downlink: need 0 < pass_duration_s <= pass_every_s")
        template = {"duration_s": duration, **{k: spec[k] for k in ("rate_mbps", "budget_bytes")
                                                 if k in spec}}
        if "rate_mbps" not in template and "budget_bytes" not in template:
            template["rate_mbps"] = 100.0
        learning = _learning_budget(table_learning, duration, "downlink")
        t, n_after = first, 0
        while n_after < after:
            out.append(Pass(t, duration, budget(template, "downlink"), "ground", learning))
            if t + duration > until_s:
                n_after += 1
            t += every
    return sorted(out, key=lambda p: p.start_s)


@dataclass(order=True)
class Stored:
    priority: int
    acquired: float
    seq: int
    ready_s: float = field(compare=False)
    frame_id: str = field(compare=False)
    nbytes: int = field(compare=False)
    body: dict = field(compare=False)
    arrays: dict = field(compare=False)     # all of them only while the station writes them
    path: Path | None = field(default=None, compare=False)   # the message, while it waits


@dataclass(order=True)
class StoredSample:
    """One learning sample waiting on board: its one-sample SAMPLE message is the file `path`."""

    priority: int
    neg_entropy: float                  # the most uncertain first (sort key)
    neg_ambiguous: float
    seq: int
    ready_s: float = field(compare=False)
    frame_id: str = field(compare=False)
    row: int = field(compare=False)
    col: int = field(compare=False)
    selection: str = field(compare=False)
    model: dict = field(compare=False)
    nbytes: int = field(compare=False)
    path: Path | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.frame_id, self.row, self.col)


def one_sample_messages(msg: Message) -> list[tuple[dict, list]]:
    """A SAMPLE message split into one message per sample, (entry, encoded parts) each: the
    unit that waits on board and goes down (the frame's fields shared, its own window)."""
    tiles = np.asarray(msg.arrays["tiles"])
    out = []
    for i, entry in enumerate(msg.body["samples"]):
        body = {**msg.body, "samples": [dict(entry)]}
        parts = encode(Message("sample", body, {"tiles": np.ascontiguousarray(tiles[i:i + 1])},
                               id=msg.id, ref=msg.ref, ts=msg.ts, source=msg.source))
        out.append((entry, [memoryview(p).cast("B") for p in parts]))   # flat: len() = bytes
    return out


def write_parts(path: Path, parts: Sequence) -> None:
    """A multipart message as one file: a 4-byte length of a msgpack list of part lengths, then
    the parts' bytes (written from the zmq frames, no copy)."""
    head = msgpack.packb([len(p) for p in parts])
    with open(path, "wb") as fh:
        fh.write(len(head).to_bytes(4, "little"))
        fh.write(head)
        for part in parts:
            fh.write(memoryview(part))


def read_parts(path: Path) -> list[memoryview]:
    """The parts `write_parts` wrote, as views of one buffer."""
    data = memoryview(Path(path).read_bytes())
    n = int.from_bytes(data[:4], "little")
    parts, at = [], 4 + n
    for length in msgpack.unpackb(data[4:at]):
        parts.append(data[at:at + length])
        at += length
    return parts


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "product"


class GroundStation:
    """Writes what comes down: <out>/<pass>/<frame_id>/product.json, and each array of the
    product as it came: PNG and JPEG bytes as .png/.jpg (mask.png, quicklook.jpg), others as .npy
    (tiles.npy or frame.npy, tile_boxes.npy); then what a GIS opens (flight_sim.products_gis:
    mask.tif, tile-NNN.tif or frame.tif as COGs, the quicklook's world file) and the product's
    STAC item (item.json, flight_sim.catalog). `write_catalog()` links the items in
    <out>/catalog.json and checks them."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.received: list[dict] = []
        self.catalogue = Catalogue(self.out_dir)
        self.gis_problems: list[str] = []
        self.samples_received: list[dict] = []

    @property
    def learning_dir(self) -> Path:
        """Where downlinked learning samples go (the factory's `learning` source reads it)."""
        return self.out_dir / "learning"

    def receive_sample(self, sample: LearningSample, pass_index: int, pass_: Pass, t_s: float,
                       nbytes: int) -> Path:
        """One learning sample to <out>/learning/<frame>-r<row>-c<col>.npz (shared.samples)."""
        path = write_sample(self.learning_dir, sample)
        self.samples_received.append({
            "frame_id": sample.frame_id, "row": sample.row, "col": sample.col, "pass": pass_index,
            "station": pass_.station, "received_s": round(t_s, 3), "bytes": nbytes,
            "selection": sample.selection, "model_id": sample.model_id,
            "model_version": sample.model_version, "entropy": sample.entropy, "file": path.name})
        return path

    def receive(self, item: Stored, pass_index: int, pass_: Pass, t_s: float) -> Path:
        folder = self.out_dir / f"pass-{pass_index:02d}" / _safe(item.frame_id)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for name, arr in item.arrays.items():
            raw = np.ascontiguousarray(arr)
            blob = raw.tobytes() if raw.dtype == np.uint8 and raw.ndim == 1 else None
            if blob is not None and blob.startswith(PNG_MAGIC):
                path = folder / f"{_safe(name.removesuffix('_png'))}.png"
                path.write_bytes(blob)
            elif blob is not None and blob.startswith(JPEG_MAGIC):
                path = folder / f"{_safe(name.removesuffix('_jpg'))}.jpg"
                path.write_bytes(blob)
            else:
                path = folder / f"{_safe(name)}.npy"
                np.save(path, raw)
            files.append(path.name)
        gis = write_gis(folder, item.body, item.arrays)
        record = {"frame_id": item.frame_id, "pass": pass_index, "station": pass_.station,
                  "received_s": round(t_s, 3), "ready_s": round(item.ready_s, 3),
                  "bytes": item.nbytes, "priority": item.priority, "files": sorted(files),
                  "gis": [f.name for f in gis.files], "georeferenced": gis.georef is not None,
                  "body": item.body}
        (folder / "product.json").write_text(json.dumps(record, indent=1, default=str))
        self.catalogue.add(product_item(item.frame_id, item.body, gis, files), folder)
        self.gis_problems += [f"{item.frame_id}: {p}" for p in gis.problems]
        self.received.append({k: v for k, v in record.items() if k != "body"} | {"folder": str(folder)})
        return folder

    def write_catalog(self) -> dict:
        """catalog.json over every item so far, read back and checked (flight_sim.catalog)."""
        if not self.catalogue.items:
            return {"catalog": None, "items": 0, "valid": False, "problems": ["no product came down"]}
        check = check_catalog(self.catalogue.write())
        check["georeferenced"] = sum(1 for r in self.received if r.get("georeferenced"))
        check["gis_problems"] = self.gis_problems[:20]
        return check


class Downlink:
    """The on-board queue (files in `queue_dir`, default beside the station's folder) and the
    passes that empty it."""

    def __init__(self, passes: list[Pass], station: GroundStation,
                 limits: Limits = Limits(max_array_bytes=1 << 30), queue_dir: Path | None = None):
        self.passes = list(passes)
        self.station = station
        self.limits = limits
        self.queue_dir = Path(queue_dir or Path(station.out_dir).parent / "downlink_queue")
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.queue: list[Stored] = []
        self.products: dict[str, Stored] = {}     # every product received, by frame_id
        self.duplicates = 0
        self.rejected: list[str] = []
        self.downlinked: dict[str, tuple[int, float]] = {}   # frame_id -> (pass index, mission s)
        self.pass_log: list[dict] = []
        self.stored_bytes = 0                     # what the queue folder holds now
        self.peak_stored_bytes = 0                # ... and the most it held at once
        self._next_pass = 0
        self._seq = 0
        # learning samples: their own queue, by (frame_id, row, col)
        self.sample_queue: list[StoredSample] = []
        self.samples: dict[tuple[str, int, int], StoredSample] = {}
        self.samples_by_frame: dict[str, list[StoredSample]] = {}
        self.samples_downlinked: dict[tuple[str, int, int], tuple[int, float]] = {}
        self.sample_messages = 0                  # SAMPLE messages stored (valid)
        self.sample_messages_seen = 0             # ... and all that came, refused ones too
        self.sample_duplicates = 0

    def receive(self, parts: list, ready_s: float | None = None) -> str | None:
        """A PRODUCT (or SAMPLE) message from the daemon, stored on disk until its pass; returns
        its frame_id (None if refused or a duplicate). `ready_s` None: not ready until
        `set_ready`."""
        try:
            msg = decode(parts, self.limits)
        except MessageError as exc:
            self.rejected.append(str(exc))
            return None
        if msg.type == "sample":
            self.sample_messages_seen += 1
            return self._receive_samples(msg, ready_s)
        if msg.type != "product":
            self.rejected.append(f"type: expected product or sample, got {msg.type}")
            return None
        frame_id = msg.body["frame_id"]
        if frame_id in self.products:             # a resent frame processed twice
            self.duplicates += 1
            return None
        nbytes = sum(len(p) for p in parts)
        path = self.queue_dir / f"{self._seq:06d}-{_safe(frame_id)[:100]}.product"
        write_parts(path, parts)
        # copies of the small arrays the report reads: the zmq frames are reused after this
        arrays = {k: np.array(v) for k, v in msg.arrays.items() if k in KEPT_ON_RECEIPT}
        ready = NOT_READY if ready_s is None else float(ready_s)
        item = Stored(int(msg.body["priority"]), float(msg.body.get("acquired", ready)), self._seq,
                      ready, frame_id, nbytes, dict(msg.body), arrays, path)
        self._seq += 1
        self.products[frame_id] = item
        heapq.heappush(self.queue, item)
        self.stored_bytes += nbytes
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes)
        return frame_id

    def _receive_samples(self, msg: Message, ready_s: float | None) -> str | None:
        """A SAMPLE message: checked (shared.samples), each sample stored as its own message."""
        try:
            samples_from_message(msg.body, np.asarray(msg.arrays["tiles"]))
        except SampleError as exc:
            self.rejected.append(str(exc))
            return None
        frame_id = msg.body["frame_id"]
        self.sample_messages += 1
        stored = 0
        for entry, parts in one_sample_messages(msg):
            key = (frame_id, int(entry["row"]), int(entry["col"]))
            if key in self.samples:            # the frame processed again after a restart
                self.sample_duplicates += 1
                continue
            nbytes = sum(len(p) for p in parts)
            path = self.queue_dir / f"{self._seq:06d}-{_safe(frame_id)[:90]}-r{key[1]}-c{key[2]}.sample"
            write_parts(path, parts)
            item = StoredSample(int(msg.body["priority"]), -float(entry["entropy"]), -float(entry["ambiguous"]),
                                self._seq, NOT_READY if ready_s is None else float(ready_s), frame_id,
                                key[1], key[2], msg.body["selection"], dict(msg.body["model"]), nbytes, path)
            self._seq += 1
            self.samples[key] = item
            self.samples_by_frame.setdefault(frame_id, []).append(item)
            heapq.heappush(self.sample_queue, item)
            self.stored_bytes += nbytes
            stored += 1
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.stored_bytes)
        return frame_id if stored else None

    def set_ready(self, frame_id: str, ready_s: float) -> None:
        """The mission time a received product (and the frame's samples) was ready (the
        simulated clock's)."""
        item = self.products.get(frame_id)
        if item is not None and frame_id not in self.downlinked:
            item.ready_s = float(ready_s)
        for sample in self.samples_by_frame.get(frame_id, ()):
            if sample.key not in self.samples_downlinked:
                sample.ready_s = float(ready_s)

    @property
    def passes_played(self) -> int:
        return self._next_pass

    def advance(self, mission_s: float) -> int:
        """Play every pass that has ended by `mission_s`; returns products sent down."""
        sent = 0
        while self._next_pass < len(self.passes) and self.passes[self._next_pass].end_s <= mission_s:
            sent += self._play(self._next_pass)
            self._next_pass += 1
        return sent

    def finish(self) -> int:
        """Play the rest of the timeline (acquisition is over)."""
        return self.advance(float("inf"))

    def _play(self, index: int) -> int:
        p = self.passes[index]
        budget, used, sent, waiting = p.budget_bytes, 0, 0, []
        while self.queue:
            item = heapq.heappop(self.queue)
            if item.ready_s > p.end_s or item.nbytes > budget - used:
                waiting.append(item)               # not ready yet, or too big for what is left
                continue
            used += item.nbytes
            t = max(p.start_s, item.ready_s) + (used / p.budget_bytes) * p.duration_s \
                if p.budget_bytes else p.end_s
            self._down(item, index, p, min(t, p.end_s))
            sent += 1
        for item in waiting:
            heapq.heappush(self.queue, item)
        learning_used, samples = self._play_samples(index, p)
        by_selection: dict[str, int] = {}
        for item in samples:
            by_selection[item.selection] = by_selection.get(item.selection, 0) + 1
        self.pass_log.append({"pass": index, "start_s": p.start_s, "end_s": p.end_s,
                              "budget_bytes": p.budget_bytes, "used_bytes": used, "products": sent,
                              "left_on_board": len(self.queue),
                              "science_within_budget": used <= p.budget_bytes,
                              "learning_budget_bytes": p.learning_budget_bytes,
                              "learning_used_bytes": learning_used, "samples": len(samples),
                              "samples_by_selection": by_selection,
                              "samples_left_on_board": len(self.sample_queue)})
        return sent

    def _play_samples(self, index: int, p: Pass) -> tuple[int, list[StoredSample]]:
        """The pass's learning budget spent on the sample queue (most uncertain first; one too
        big for what is left waits, smaller ones behind it may go); (bytes used, samples sent)."""
        budget, used, sent, waiting = p.learning_budget_bytes, 0, [], []
        while self.sample_queue and budget > 0:
            item = heapq.heappop(self.sample_queue)
            if item.ready_s > p.end_s or item.nbytes > budget - used:
                waiting.append(item)
                continue
            used += item.nbytes
            t = min(max(p.start_s, item.ready_s) + used / budget * p.duration_s, p.end_s)
            self._sample_down(item, index, p, t)
            sent.append(item)
        for item in waiting:
            heapq.heappush(self.sample_queue, item)
        return used, sent

    def _sample_down(self, item: StoredSample, index: int, pass_: Pass, t_s: float) -> None:
        msg = decode(read_parts(item.path), self.limits)
        sample, = samples_from_message(msg.body, np.asarray(msg.arrays["tiles"]))
        self.station.receive_sample(sample, index, pass_, t_s, item.nbytes)
        self.samples_downlinked[item.key] = (index, t_s)
        item.path.unlink(missing_ok=True)
        item.path = None
        self.stored_bytes -= item.nbytes

    def _down(self, item: Stored, index: int, pass_: Pass, t_s: float) -> None:
        """One product to the ground station: read back from the queue folder, written by the
        station, then gone from the queue; only what the report scores stays in memory."""
        msg = decode(read_parts(item.path), self.limits)
        item.arrays = dict(msg.arrays)
        self.station.receive(item, index, pass_, t_s)
        self.downlinked[item.frame_id] = (index, t_s)
        item.arrays = {k: np.array(v) for k, v in item.arrays.items()
                       if k in KEPT_AFTER_DOWNLINK or k.startswith("mask_")}
        item.path.unlink(missing_ok=True)
        item.path = None
        self.stored_bytes -= item.nbytes

    def summary(self) -> dict:
        down = [self.products[f] for f in self.downlinked]
        return {"products": len(self.products), "downlinked": len(self.downlinked),
                "left_on_board": len(self.queue), "duplicates_ignored": self.duplicates,
                "rejected": self.rejected, "bytes_produced": sum(p.nbytes for p in self.products.values()),
                "bytes_downlinked": sum(p.nbytes for p in down), "passes": self.pass_log,
                "learning": self.learning_summary()}

    def learning_summary(self) -> dict:
        """The learning samples: received, downlinked, left on board, bytes, by selection; the
        budgets per pass, and whether every pass kept the science products within theirs."""
        by_selection: dict[str, dict] = {}
        for item in self.samples.values():
            sel = by_selection.setdefault(item.selection, {"samples": 0, "downlinked": 0, "bytes_received": 0,
                                                           "bytes_downlinked": 0})
            down = item.key in self.samples_downlinked
            sel["samples"] += 1
            sel["downlinked"] += int(down)
            sel["bytes_received"] += item.nbytes
            sel["bytes_downlinked"] += item.nbytes if down else 0
        versions = sorted({(i.model.get("model_id"), i.model.get("version")) for i in self.samples.values()},
                          key=str)
        return {"messages": self.sample_messages, "samples": len(self.samples),
                "downlinked": len(self.samples_downlinked), "left_on_board": len(self.sample_queue),
                "duplicates_ignored": self.sample_duplicates,
                "bytes_received": sum(s["bytes_received"] for s in by_selection.values()),
                "bytes_downlinked": sum(s["bytes_downlinked"] for s in by_selection.values()),
                "by_selection": by_selection,
                "models": [{"model_id": m, "version": v} for m, v in versions],
                "folder": str(self.station.learning_dir),
                "passes": [{"pass": e["pass"], "learning_budget_bytes": e["learning_budget_bytes"],
                            "learning_used_bytes": e["learning_used_bytes"], "samples": e["samples"],
                            "samples_by_selection": e["samples_by_selection"],
                            "science_budget_bytes": e["budget_bytes"], "science_used_bytes": e["used_bytes"],
                            "science_within_budget": e["science_within_budget"]} for e in self.pass_log],
                "science_within_budget": all(e["science_within_budget"] for e in self.pass_log)}
