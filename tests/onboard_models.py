"""Small real OpenVINO models for tests, built with openvino's opset API (no torch).

The model is a per-pixel 1x1 convolution that reads brightness: it undoes the manifest's
normalisation inside its weights, so its logits depend on the mean reflectance B of the bands:

    class 0 (e.g. "clear")            logit 0
    "cloud", "ship"                   GAIN * (B - CLOUD_REFLECTANCE)     bright   -> cloud
                                                                         (a ship model reads one
                                                                         band: `band_weights`)
    "shadow" / "cloud_shadow"         GAIN * (SHADOW_REFLECTANCE - B)    dark     -> shadow
    any other class                   -10                                never wins

so a test can paint a frame whose truth it knows (`synthetic_frame`). `expected_outputs`
computes the same thing in numpy (the ground's "reference outputs"); `make_test_model_files`
writes model.xml/.bin (FP16 weights) and reference.npz into a folder and `make_test_manifest`
describes them, ready for `shared.bundle.build_bundle(out, files, manifest, private_key)`.

    files = make_test_model_files(tmp / "m", bands=BANDS_6, classes=CLASSES_3, tile=64)
    manifest = make_test_manifest(files, model_id="cloud-test", version=2, tile=64, overlap=8)

`make_int8_test_model_files` quantises the same model with NNCF (a real INT8 IR with
FakeQuantize nodes; NNCF is a ground tool, imported only there) and computes its reference
outputs by running that IR at the f32 hint, as the ground does for a bundle validated at int8.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

BANDS_6 = ("B02", "B03", "B04", "B08", "B11", "B12")
BANDS_13 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
CLASSES_2 = ("clear", "cloud")
CLASSES_3 = ("clear", "cloud", "shadow")
BRIGHT_CLASSES = ("cloud", "ship")        # classes the brightness model sees where B is high

GAIN = 40.0
CLOUD_REFLECTANCE = 0.30
SHADOW_REFLECTANCE = 0.06
# Reflectances that a frame painted by `synthetic_frame` uses, far from both decision points.
CLEAR_VALUE, CLOUD_VALUE, SHADOW_VALUE = 0.15, 0.60, 0.02


def default_scaling(n_bands: int) -> tuple[list[float], list[float]]:
    """A plausible per-band mean/std (reflectance), different per band so band order matters."""
    mean = [round(0.10 + 0.01 * i, 4) for i in range(n_bands)]
    std = [round(0.05 + 0.005 * i, 4) for i in range(n_bands)]
    return mean, std


def weights(classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
            gain: float = GAIN, band_weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1x1 conv weights (K, C) and bias (K,) on *normalised* input x = (r - mean) / std.

    Brightness B is the mean reflectance of the bands, or their weighted sum with
    `band_weights` (e.g. one-hot: only one band counts, so band order matters)."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    c = len(mean)
    a = np.full(c, 1.0 / c) if band_weights is None else np.asarray(band_weights, np.float64)
    # B = sum_c a_c (x_c * std_c + mean_c)  =  w . x + m
    w_b, m_b = a * std, float((a * mean).sum())
    w = np.zeros((len(classes), c))
    b = np.zeros(len(classes))
    for k, name in enumerate(classes):
        if k == 0:
            continue
        if name in BRIGHT_CLASSES:
            w[k], b[k] = gain * w_b, gain * (m_b - CLOUD_REFLECTANCE)
        elif name in ("shadow", "cloud_shadow"):
            w[k], b[k] = -gain * w_b, gain * (SHADOW_REFLECTANCE - m_b)
        else:
            b[k] = -10.0
    return w.astype(np.float32), b.astype(np.float32)


def _fp16(a: np.ndarray) -> np.ndarray:
    """The IR stores weights in FP16: expected outputs use the same rounded weights."""
    return a.astype(np.float16).astype(np.float32)


def make_test_ir(out_dir: str | Path, bands: Sequence[str], classes: Sequence[str], tile: int = 64,
                 *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 gain: float = GAIN, softmax: bool = False, name: str = "model",
                 band_weights: Sequence[float] | None = None) -> tuple[Path, Path]:
    """Write `name`.xml/.bin: input (N, C, tile, tile) float32 normalised (N dynamic), output
    (N, K, tile, tile) logits, or probabilities with `softmax=True`; weights saved as FP16."""
    import openvino as ov
    import openvino.opset13 as ops

    if mean is None or std is None:
        mean, std = default_scaling(len(bands))
    w, b = weights(classes, mean, std, gain, band_weights)
    k, c = w.shape
    x = ops.parameter(ov.PartialShape([-1, c, tile, tile]), ov.Type.f32, name="tiles")
    conv = ops.convolution(x, ops.constant(w.reshape(k, c, 1, 1)), [1, 1], [0, 0], [0, 0], [1, 1])
    y = ops.add(conv, ops.constant(b.reshape(1, k, 1, 1)))
    if softmax:
        y = ops.softmax(y, 1)
    model = ov.Model([ops.result(y)], [x], "brightness_to_cloud")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml, bin_ = out_dir / f"{name}.xml", out_dir / f"{name}.bin"
    ov.save_model(model, xml, compress_to_fp16=True)
    return xml, bin_


def expected_outputs(reflectance: np.ndarray, classes: Sequence[str], *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     gain: float = GAIN, activation: str = "softmax",
                     band_weights: Sequence[float] | None = None) -> np.ndarray:
    """What the test IR computes for reflectance tiles (N, C, t, t) (normalised first, as the
    daemon does), after `activation`: (N, K, t, t) float32."""
    reflectance = np.asarray(reflectance, np.float32)
    if mean is None or std is None:
        mean, std = default_scaling(reflectance.shape[1])
    w, b = weights(classes, mean, std, gain, band_weights)
    x = (reflectance - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    logits = np.einsum("kc,nchw->nkhw", _fp16(w), x) + _fp16(b)[:, None, None]
    if activation == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if activation == "sigmoid":
        return (1 / (1 + np.exp(-logits))).astype(np.float32)
    return logits.astype(np.float32)


def synthetic_frame(bands: Sequence[str], height: int, width: int, *,
                    clouds: Sequence[tuple[int, int, int, int]] = (),
                    shadows: Sequence[tuple[int, int, int, int]] = (),
                    dtype: str = "uint16", scale: float = 1e-4, seed: int = 0,
                    noise: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """A frame (bands, H, W) whose truth is known, and that truth (H, W) uint8 (0 clear,
    1 cloud, 2 shadow). Boxes are (row0, row1, col0, col1). Values are reflectance / scale
    in `dtype` (uint16 digital numbers by default, as a Sentinel-2 L1C payload sends)."""
    truth = np.zeros((height, width), np.uint8)
    for r0, r1, c0, c1 in clouds:
        truth[r0:r1, c0:c1] = 1
    for r0, r1, c0, c1 in shadows:
        truth[r0:r1, c0:c1] = 2
    refl = np.array([CLEAR_VALUE, CLOUD_VALUE, SHADOW_VALUE], np.float32)[truth]
    rng = np.random.default_rng(seed)
    data = refl[None] + rng.normal(0, noise, (len(bands), height, width)).astype(np.float32)
    data = np.clip(data, 0, None) / scale
    if np.dtype(dtype).kind in "iu":
        data = np.rint(data)
    return data.astype(dtype), truth


def make_test_model_files(out_dir: str | Path, *, bands: Sequence[str] = BANDS_6,
                          classes: Sequence[str] = CLASSES_3, tile: int = 64,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          gain: float = GAIN, n_reference: int = 3, reference_gain: float | None = None,
                          band_weights: Sequence[float] | None = None, seed: int = 0) -> dict[str, Path]:
    """model.xml, model.bin (logits) and reference.npz (reflectance tiles with clear, cloud and
    shadow areas; softmax probabilities) in `out_dir`; returns {arcname: path}.

    `reference_gain`: compute the reference with another gain than the model's, i.e. a bundle
    whose self-test must fail.
    """
    from shared.bundle import save_reference

    if mean is None or std is None:
        mean, std = default_scaling(len(bands))
    out_dir = Path(out_dir)
    xml, bin_ = make_test_ir(out_dir, bands, classes, tile, mean=mean, std=std, gain=gain,
                             band_weights=band_weights)
    tiles = []
    for i in range(n_reference):
        h = tile // 2
        data, _ = synthetic_frame(bands, tile, tile, clouds=[(0, h, 0, h)] if i % 3 != 2 else [],
                                  shadows=[(h, tile, h, tile)] if i % 3 != 1 else [],
                                  dtype="float32", scale=1.0, seed=seed + i)
        tiles.append(data)
    ref_tiles = np.stack(tiles)
    probs = expected_outputs(ref_tiles, classes, mean=mean, std=std,
                             gain=gain if reference_gain is None else reference_gain,
                             band_weights=band_weights)
    ref = save_reference(out_dir / "reference.npz", ref_tiles, probs)
    return {"model.xml": xml, "model.bin": bin_, "reference.npz": ref}


def make_int8_test_model_files(out_dir: str | Path, *, bands: Sequence[str] = BANDS_6,
                               classes: Sequence[str] = CLASSES_3, tile: int = 64,
                               n_reference: int = 3, seed: int = 0) -> dict[str, Path]:
    """As `make_test_model_files`, but model.xml/.bin is the model quantised to INT8 by
    `nncf.quantize` (calibrated on the normalised reference tiles) and reference.npz holds what
    that IR computes (compiled at the f32 hint, softmax after)."""
    import nncf
    import openvino as ov

    from shared.bundle import load_reference, save_reference

    out_dir = Path(out_dir)
    files = make_test_model_files(out_dir / "fp32", bands=bands, classes=classes, tile=tile,
                                  n_reference=n_reference, seed=seed)
    tiles, _ = load_reference(files["reference.npz"])
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in default_scaling(len(bands)))
    normalised = (tiles - mean) / std
    core = ov.Core()
    quantised = nncf.quantize(core.read_model(files["model.xml"]),
                              nncf.Dataset([t[None] for t in normalised]), subset_size=len(tiles))
    xml, bin_ = out_dir / "model.xml", out_dir / "model.bin"
    ov.save_model(quantised, xml, compress_to_fp16=False)
    logits = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(normalised)[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref = save_reference(out_dir / "reference.npz", tiles, e / e.sum(axis=1, keepdims=True))
    return {"model.xml": xml, "model.bin": bin_, "reference.npz": ref}


def is_int8_ir(xml: str | Path) -> bool:
    """Whether an IR carries FakeQuantize nodes (what NNCF's post-training quantisation adds)."""
    return 'type="FakeQuantize"' in Path(xml).read_text()


def make_test_manifest(files: dict[str, Path] | None = None, *, model_id: str = "cloud-test",
                       version: int = 1, bands: Sequence[str] = BANDS_6,
                       classes: Sequence[str] = CLASSES_3, tile: int = 64, overlap: int = 8,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       threshold: dict | None = None, opening_radius: int = 2,
                       policy: dict | None = None, parent: dict | None = None,
                       max_abs_diff: float = 1e-2, min_mask_agreement: float = 0.99,
                       precision: str = "fp32") -> dict:
    """A validated manifest for files from `make_test_model_files` (same defaults).

    Default policy: discard a frame more than 60% cloud, else keep (priority 1 if any shadow
    covers over 5%, else 5)."""
    from shared.manifest import make_manifest

    if mean is None or std is None:
        mean, std = default_scaling(len(bands))
    if policy is None:
        policy = {"rules": [{"if": {"class": "cloud", "fraction_above": 0.6}, "then": "discard"}],
                  "default": {"then": "keep", "priority": 5}}
        if "shadow" in classes:
            policy["rules"].append({"if": {"class": "shadow", "fraction_above": 0.05},
                                    "then": "keep", "priority": 1})
    return make_manifest(
        model_id=model_id, version=version, bands=bands, mean=mean, std=std, classes=classes,
        tile_size=tile, overlap=overlap, activation="softmax",
        threshold=threshold if threshold is not None else {"cloud": 0.5},
        opening_radius=opening_radius, policy=policy, parent=parent,
        reference={"file": "reference.npz", "max_abs_diff": max_abs_diff,
                   "min_mask_agreement": min_mask_agreement},
        files=files, precision=precision)
