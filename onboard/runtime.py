"""OpenVINO inference for the daemon: a compiled model behind an AsyncInferQueue.

Two things are folded into the compiled graph because OpenVINO does them for almost nothing
there, while numpy would need extra passes over every tile:

- the input scaling: the compiled model takes raw frame values (uint16, int16 or float32) plus
  a per-band `gain` and `offset` and computes `x * gain + offset` itself, so the tiles the
  daemon cuts stay in the frame's dtype (half the bytes of float32 for uint16 frames) and a new
  frame scale needs no recompilation;
- the output activation (softmax / sigmoid from the manifest), so requests hand back
  probabilities.

Frames go through a second graph (`run_masks`, `_prepare_masks`): raw tiles cut f x larger in,
binned f x f to the manifest's processing GSD (AvgPool), scaled by constants (at fp32 and int8
folded into the network's first layers, `_folded_scaling`; else a multiply-add before them), the
network, the activation and the per-class thresholds: uint8 class indices out, one
byte per pixel back to Python. With `scores` (a policy with a `learning` block) the same graph
has a second output, (batch, 2) float32 per tile: [mean normalised entropy, ambiguous share]
(`_tile_scores`; shared.samples). `run`/`infer` (probabilities, runtime scaling) serve the
self-test.

The model is compiled at one precision of the bundle contract (onboard.precision): its
INFERENCE_PRECISION_HINT (fp32 and int8 -> f32, fp16 -> f16, bf16 -> bf16), on every device that
takes the hint. `device_capabilities` asks OpenVINO which precisions a device runs.

`OpenVinoModel.run` streams batches: a `fill` callback writes each batch straight into an idle
request's input tensor, and `on_output` receives each finished batch (a view of the request's
output tensor, valid only during the call) while the other requests are still inferring, so
cutting tiles and post-processing overlap with inference.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from onboard import ov
from onboard.errors import ModelLoadError
from shared.manifest import INFERENCE_HINTS
from shared.samples import AMBIGUOUS_MARGIN

ACTIVATIONS = ("softmax", "sigmoid", "none")
INPUT_DTYPES = ("uint16", "int16", "float32")

# The CPU plugin defaults to bfloat16 where the CPU has AVX512-BF16/AMX, which is off by up to
# ~0.1 in the logits of a 1x1 conv: the hint always comes from the bundle's precision (f32 for
# fp32 bundles), never from the plugin's default. `config` entries win over both.
DEFAULT_CONFIG = {"PERFORMANCE_HINT": "THROUGHPUT"}
PRECISION_HINT = "INFERENCE_PRECISION_HINT"
ONE_STREAM = {"NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "1"}   # the frame graph's tail variant
MASK_VARIANTS = 2           # frame graphs kept compiled (one per scale/thresholds/binning seen)
FOLD_PRECISIONS = ("fp32", "int8")  # the frame graph's scaling folded into the first layers
SCORES = 2                  # the scores output per tile: [entropy, ambiguous share]
LOG_EPS = 1e-12             # p ln p with p = 0 is 0: ln(max(p, eps)) keeps 0 * -inf out


def device_capabilities(device: str, core=None) -> tuple[str, ...]:
    """The device's OPTIMIZATION_CAPABILITIES (FP32, FP16, BF16, INT8, ...). A composite name
    ("AUTO:GPU,CPU") is asked by its plugin name; a device OpenVINO cannot ask raises
    ModelLoadError naming it (declare `[runtime] capabilities` in the config instead)."""
    core = core or ov.Core()
    for name in dict.fromkeys((device, device.split(":", 1)[0])):
        try:
            return tuple(str(c).upper() for c in core.get_property(name, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0]
    raise ModelLoadError(f"device {device}: OpenVINO cannot report its precisions "
                         f"(OPTIMIZATION_CAPABILITIES: {reason}); declare [runtime] capabilities "
                         "in the config") from None


def _takes_precision_hint(core, device: str) -> bool:
    try:
        return PRECISION_HINT in core.get_property(device, "SUPPORTED_PROPERTIES")
    except RuntimeError:        # an unknown device: compile_model will say so
        return False


def read_model(xml_path: str | Path, core=None):
    """Read an IR and check it has one 4-D input (N, C, H, W) with a fixed C, and one output."""
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise ModelLoadError(f"{xml_path}: model file not found")
    core = core or ov.Core()
    try:
        model = core.read_model(str(xml_path))
    except RuntimeError as exc:
        raise ModelLoadError(f"{xml_path}: OpenVINO cannot read it: {str(exc).splitlines()[0]}") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLoadError(f"{xml_path}: expected one input and one output, got "
                             f"{len(model.inputs)} and {len(model.outputs)}")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic:
        raise ModelLoadError(f"{xml_path}: input must be (N, C, H, W) with a fixed C, got {shape}")
    return model


def _fixed_tiles(model, tile: int, batch: int):
    """A copy of `model` whose input is fixed to (batch, C, tile, tile); (copy, C)."""
    model = model.clone()
    channels = model.inputs[0].get_partial_shape()[1].get_length()
    try:
        model.reshape({model.inputs[0]: ov.PartialShape([batch, channels, tile, tile])})
    except RuntimeError as exc:
        raise ModelLoadError(f"input cannot take ({batch}, {channels}, {tile}, {tile}) tiles: "
                             f"{str(exc).splitlines()[0]}") from None
    return model, channels


def _activated(logits, activation: str):
    """The network's logits through the manifest's activation ("none" leaves them)."""
    if activation == "softmax":
        return ov.ops.softmax(logits, 1).output(0)
    if activation == "sigmoid":
        return ov.ops.sigmoid(logits).output(0)
    return logits


def _prepare(model, tile: int, batch: int, input_dtype: str, activation: str):
    """Fix the input shape to (batch, C, tile, tile), put `x * gain + offset` in front of the
    network (raw values of `input_dtype` in) and the activation behind it."""
    model, channels = _fixed_tiles(model, tile, batch)
    old = model.get_parameters()[0]
    raw = ov.ops.parameter([batch, channels, tile, tile], ov.Type(np.dtype(input_dtype)), name="raw")
    gain = ov.ops.parameter([1, channels, 1, 1], ov.Type.f32, name="gain")
    offset = ov.ops.parameter([1, channels, 1, 1], ov.Type.f32, name="offset")
    x = raw if input_dtype == "float32" else ov.ops.convert(raw, "f32")
    x = ov.ops.add(ov.ops.multiply(x, gain), offset)
    for target in list(old.output(0).get_target_inputs()):
        target.replace_source_output(x.output(0))
    result = model.get_results()[0]
    if activation != "none":
        result.input(0).replace_source_output(_activated(result.input_value(0), activation))
    return ov.Model(model.get_results(), [raw, gain, offset], model.get_friendly_name())


def _class_mask(probs, thresholds: np.ndarray):
    """(N, K, t, t) scores -> (N, 1, t, t) uint8 class indices, shared.postprocess.threshold's
    rule in the graph: a thresholded class competes only where it reaches its threshold, the
    running maximum over classes keeps the lower index on ties (strict ">"), and a pixel no
    class is eligible for stays class 0. Elementwise opset1 ops only (2022.3 runs them)."""
    k = len(thresholds)
    parts = list(ov.ops.split(probs, ov.ops.constant(np.int64(1)), k).outputs()) if k > 1 else [probs.output(0)]
    scores = []
    for c, part in enumerate(parts):
        if np.isnan(thresholds[c]):
            scores.append(part)
        else:
            eligible = ov.ops.greater_equal(part, ov.ops.constant(np.float32(thresholds[c])))
            scores.append(ov.ops.select(eligible, part, ov.ops.constant(np.float32(-np.inf))).output(0))
    best, cls = scores[0], ov.ops.constant(np.zeros((1, 1, 1, 1), np.uint8)).output(0)
    for c in range(1, k):
        cls = ov.ops.select(ov.ops.greater(scores[c], best), ov.ops.constant(np.full((1, 1, 1, 1), c, np.uint8)),
                            cls).output(0)
        if c < k - 1:
            best = ov.ops.maximum(best, scores[c]).output(0)
    return cls


def _tile_scores(probs, activation: str, thresholds: np.ndarray, margin: float = AMBIGUOUS_MARGIN):
    """(N, K, t, t) probabilities -> (N, 2) float32 per tile: [mean normalised entropy, share of
    ambiguous pixels], both in 0..1 (shared.samples). Softmax (and "none": probabilities
    already): the entropy over the K classes / ln K; a pixel is ambiguous where its two likeliest
    classes lie within `margin` (at least two classes above top - margin: no TopK needed).
    Sigmoid: each class's binary entropy / ln 2, averaged over the classes; a pixel is ambiguous
    where any class lies within margin / 2 of its threshold (0.5 where it has none). Reductions
    and elementwise opset1 ops only (OpenVINO 2022.3 and the Myriad X run them)."""
    c = ov.ops.constant
    k = len(thresholds)
    all_axes, class_axis, pixel_axes = (c(np.array(a, np.int64)) for a in ([1, 2, 3], [1], [1, 2]))

    def plogp(p):
        return ov.ops.multiply(p, ov.ops.log(ov.ops.maximum(p, c(np.float32(LOG_EPS)))))

    if activation == "sigmoid":
        q = ov.ops.subtract(c(np.float32(1.0)), probs)
        h = ov.ops.add(plogp(probs), plogp(q))
        entropy = ov.ops.multiply(ov.ops.reduce_mean(h, all_axes, False), c(np.float32(-1 / np.log(2))))
        centre = np.where(np.isnan(thresholds), 0.5, thresholds).astype(np.float32).reshape(1, k, 1, 1)
        near = ov.ops.less(ov.ops.abs(ov.ops.subtract(probs, c(centre))), c(np.float32(margin / 2)))
        ambiguous = ov.ops.reduce_max(ov.ops.convert(near, "f32"), class_axis, False)
    elif k > 1:
        # mean over pixels of sum over classes = K * mean over (classes, pixels)
        entropy = ov.ops.multiply(ov.ops.reduce_mean(plogp(probs), all_axes, False),
                                  c(np.float32(-k / np.log(k))))
        top = ov.ops.reduce_max(probs, class_axis, True)
        close = ov.ops.greater(probs, ov.ops.subtract(top, c(np.float32(margin))))
        count = ov.ops.reduce_sum(ov.ops.convert(close, "f32"), class_axis, False)
        ambiguous = ov.ops.convert(ov.ops.greater(count, c(np.float32(1.5))), "f32")
    else:                   # one softmax class: certain everywhere
        entropy = ov.ops.multiply(ov.ops.reduce_mean(probs, all_axes, False), c(np.float32(0.0)))
        ambiguous = ov.ops.multiply(probs, c(np.float32(0.0)))
        ambiguous = ov.ops.reduce_max(ambiguous, class_axis, False)
    ambiguous = ov.ops.reduce_mean(ambiguous, pixel_axes, False)
    one = c(np.array([1], np.int64))
    both = ov.ops.concat([ov.ops.unsqueeze(entropy, one), ov.ops.unsqueeze(ambiguous, one)], 1)
    return ov.ops.clamp(both, 0.0, 1.0)     # bf16 rounding must not leave 0..1


def _constant(output) -> np.ndarray | None:
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _folded_scaling(targets, x, gain: np.ndarray, offset: np.ndarray, core) -> bool:
    """Put `x * gain + offset` inside the network's first layers where they can take it exactly,
    instead of an elementwise pass over every input value (1.4-2.8 ms of a 100 ms f32 batch of
    two 256 x 256 tiles on an AVX2 EPYC). False, and nothing changed, where the input feeds
    anything else.

    - FakeQuantize (an INT8 IR: NNCF quantises the input first) with constant ranges, on
      float32 tiles: for gain > 0, FQ(x g + o; lo, hi) = FQ(x; (lo - o) / g, (hi - o) / g),
      per band.
    - Convolution / GroupConvolution: conv_W(x g + o) = conv_{W g}(x) + conv_W(o), where
      conv_W(o), the convolution of a constant image of the offsets with the network's own zero
      padding, is a constant map computed here once (at the borders it differs from the
      interior, so a bias alone would not do); OpenVINO folds W g into the weights."""
    targets = list(targets)
    layers = [t.get_node() for t in targets]
    kinds = {n.get_type_name() for n in layers}
    if not targets or any(t.get_index() != 0 for t in targets) or (gain <= 0).any():
        return False
    x = x if isinstance(x, ov.Output) else x.output(0)
    if kinds == {"FakeQuantize"}:
        ranges = [[_constant(fq.input_value(i)) for i in (1, 2)] for fq in layers]
        if any(r is None or r.size != 1 for pair in ranges for r in pair) \
                or x.get_node().get_type_name() == "Convert":
            # (a Convert from uint16 tiles would be fused into the FakeQuantize, which the CPU
            # plugin's oneDNN kernels cannot read: "does not support u16")
            return False
        g, o = gain.reshape(1, -1, 1, 1), offset.reshape(1, -1, 1, 1)
        for fq, (lo, hi) in zip(layers, ranges):
            lo, hi = ((float(v.ravel()[0]) - o) / g for v in (lo, hi))
            y = ov.ops.fake_quantize(x, ov.ops.constant(lo.astype(np.float32)), ov.ops.constant(hi.astype(np.float32)),
                                     fq.input_value(3), fq.input_value(4), fq.get_attributes()["levels"])
            for consumer in list(fq.output(0).get_target_inputs()):
                consumer.replace_source_output(y.output(0))
        return True
    if not kinds <= {"Convolution", "GroupConvolution"}:
        return False
    shape = tuple(d.get_length() for d in x.get_partial_shape())
    image = ov.ops.parameter([1, *shape[1:]], ov.Type.f32, name="offsets")
    offsets = np.broadcast_to(offset.reshape(1, -1, 1, 1), (1, *shape[1:])).astype(np.float32)
    exact = {PRECISION_HINT: "f32"} if _takes_precision_hint(core, "CPU") else {}
    for conv in layers:
        a, weights = conv.get_attributes(), conv.input_value(1)
        grouped = conv.get_type_name() == "GroupConvolution"
        make = ov.ops.group_convolution if grouped else ov.ops.convolution
        geometry = (a["strides"], a["pads_begin"], a["pads_end"], a["dilations"], a["auto_pad"])
        g = gain.reshape(weights.get_partial_shape()[0].get_length(), 1, -1, 1, 1) if grouped \
            else gain.reshape(1, -1, 1, 1)
        constant = ov.Model([make(image, weights, *geometry)], [image])
        request = core.compile_model(constant, "CPU", exact).create_infer_request()
        request.infer({0: offsets})                 # (2022.3's compiled model is not callable by index)
        m = request.get_output_tensor(0).data.copy()
        y = ov.ops.add(make(x, ov.ops.multiply(weights, ov.ops.constant(g.astype(np.float32))), *geometry),
                       ov.ops.constant(m.astype(np.float32, copy=False)))
        for consumer in list(conv.output(0).get_target_inputs()):
            consumer.replace_source_output(y.output(0))
    return True


def _prepare_masks(model, tile: int, batch: int, input_dtype: str, activation: str, gain: np.ndarray,
                   offset: np.ndarray, thresholds: np.ndarray, factor: int, scaling_inputs: bool = False,
                   scores: bool = False, fold: bool = False, core=None):
    """The graph frames run through: raw (batch, C, factor*tile, factor*tile) values of
    `input_dtype` in, (batch, 1, tile, tile) uint8 class indices out (and with `scores` a second
    output, (batch, 2) float32: `_tile_scores` of the same probabilities). In the graph, where they
    are cheapest: the mean over factor x factor blocks (binning to the model's ground sampling
    distance), the scaling with constant gain and offset (an elementwise multiply-add before the
    network), the activation and the per-class thresholds (OpenVINO's threads, not Python).
    `scaling_inputs`: gain and offset as runtime inputs instead (an INT8 IR: OpenVINO's
    low-precision passes take Convert(u16) -> Multiply(constant) for a dequantisation and fail).
    `fold`: the scaling folded into the network's first layers where they take it exactly
    (`_folded_scaling`, with `core`; at the precisions computed in f32: at bf16/fp16 raw values
    and folded offsets would lose the precision that normalising first keeps); else
    `scaling_inputs` or constants as above."""
    model, channels = _fixed_tiles(model, tile, batch)
    old = model.get_parameters()[0]
    side = tile * factor
    raw = ov.ops.parameter([batch, channels, side, side], ov.Type(np.dtype(input_dtype)), name="raw")
    x = raw if input_dtype == "float32" else ov.ops.convert(raw, "f32")
    if factor > 1:
        x = ov.ops.avg_pool(x, [factor, factor], [0, 0], [0, 0], [factor, factor], exclude_pad=True)
    params = [raw]
    targets = old.output(0).get_target_inputs()
    if not (fold and _folded_scaling(targets, x, gain, offset, core or ov.Core())):
        if scaling_inputs:
            params += [ov.ops.parameter([1, channels, 1, 1], ov.Type.f32, name=n) for n in ("gain", "offset")]
            x = ov.ops.add(ov.ops.multiply(x, params[1]), params[2])
        else:
            x = ov.ops.add(ov.ops.multiply(x, ov.ops.constant(gain.reshape(1, -1, 1, 1))),
                           ov.ops.constant(offset.reshape(1, -1, 1, 1)))
        for target in list(targets):
            target.replace_source_output(x.output(0))
    probs = _activated(model.get_results()[0].input_value(0), activation)
    results = [ov.ops.result(_class_mask(probs, thresholds))]
    if scores:
        results.append(ov.ops.result(_tile_scores(probs, activation, thresholds)))
    return ov.Model(results, params, model.get_friendly_name())


@dataclass
class _Buffers:
    """Input and output memory shared with OpenVINO (ov.Tensor over numpy, no copies)."""

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    input_tensors: list
    output_tensors: list
    extras: list[np.ndarray] | None = None        # a second output (the tile scores), if any
    extra_tensors: list | None = None

    @classmethod
    def make(cls, n: int, shape_in: tuple, dtype: str, shape_out: tuple,
             out_dtype: str = "float32", shape_extra: tuple | None = None) -> "_Buffers":
        inputs = [np.zeros(shape_in, dtype) for _ in range(n)]
        outputs = [np.zeros(shape_out, out_dtype) for _ in range(n)]
        extras = None if shape_extra is None else [np.zeros(shape_extra, np.float32) for _ in range(n)]
        return cls(inputs, outputs, [ov.shared_tensor(a) for a in inputs],
                   [ov.shared_tensor(a) for a in outputs], extras,
                   None if extras is None else [ov.shared_tensor(a) for a in extras])


class OpenVinoModel:
    """A segmentation IR compiled for fixed tiles, run batch by batch through an AsyncInferQueue.

    `precision` (fp32, fp16, bf16, int8) picks the inference precision hint (INFERENCE_HINTS).
    `infer(tiles)` takes (N, C, t, t) tiles: float32 already normalised (the plain IR's input),
    or raw values with `gain`/`offset` (per band) to normalise inside the graph. One compiled
    variant per input dtype, compiled on first use. `run_masks` / `infer_masks`: the frame graph
    (uint8 class masks), one compiled variant per dtype, scaling, thresholds and binning factor
    (the last MASK_VARIANTS kept).
    """

    def __init__(self, xml_path: str | Path, device: str = "CPU", num_requests: int | None = None,
                 *, tile: int | None = None, batch_size: int = 2, activation: str = "none",
                 config: dict | None = None, precision: str = "fp32"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in INFERENCE_HINTS:
            raise ValueError(f"precision must be one of {', '.join(INFERENCE_HINTS)}, got {precision!r}")
        self.precision = precision
        self.xml_path = Path(xml_path)
        self.device = device
        self.activation = activation
        self.batch_size = int(batch_size)
        self._core = ov.Core()
        self._model = read_model(self.xml_path, self._core)
        shape = self._model.inputs[0].get_partial_shape()
        self.channels = shape[1].get_length()
        if tile is None:
            if shape[2].is_dynamic or shape[3].is_dynamic or shape[2] != shape[3]:
                raise ModelLoadError(f"{self.xml_path}: input {shape} has no fixed square tile size; pass tile=")
            tile = shape[2].get_length()
        self.tile = int(tile)
        self._config = dict(DEFAULT_CONFIG)
        if _takes_precision_hint(self._core, device):
            self._config[PRECISION_HINT] = INFERENCE_HINTS[precision]
        self._config.update(config or {})
        self._num_requests = num_requests
        self._variants: dict[str, tuple] = {}
        self._mask_variants: dict[tuple, dict[int, tuple]] = {}   # constants -> {batch: variant}
        self._lock = threading.Lock()
        self.num_classes = self._variant("float32")[0].outputs[0].get_partial_shape()[1].get_length()

    # -- compiled variants -------------------------------------------------------------------
    def _compile(self, model, shape_in: tuple, dtype: str, out_dtype: str, single: bool = False) -> tuple:
        """(compiled model, AsyncInferQueue, buffer pool one larger than the queue). `single`: one
        request on one stream of one thread (the CPU's: ONE_STREAM), for the few tiles left after
        a frame's whole batches: half the scratch memory of two streams, and not pinned, so that
        the OS runs it on whichever core the frame's last batches leave free (pinned, it shared
        one core with a main stream: no faster than the padded batch)."""
        config = self._config
        if single and self.device == "CPU":
            config = {**config, **ONE_STREAM}
            if "ENABLE_CPU_PINNING" in self._core.get_property(self.device, "SUPPORTED_PROPERTIES"):
                config["ENABLE_CPU_PINNING"] = False      # runs on whichever core is free (2023.0+)
        try:
            compiled = self._core.compile_model(model, self.device, config)
        except RuntimeError as exc:
            raise ModelLoadError(f"{self.xml_path}: cannot compile for {self.device}: "
                                 f"{str(exc).splitlines()[0]}") from None
        n = 1 if single else max(1, int(self._num_requests
                                        or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        shape_out = tuple(compiled.outputs[0].get_shape())
        shape_extra = tuple(compiled.outputs[1].get_shape()) if len(compiled.outputs) > 1 else None
        return (compiled, ov.AsyncInferQueue(compiled, n),
                _Buffers.make(n + 1, shape_in, dtype, shape_out, out_dtype, shape_extra))

    def _variant(self, dtype: str):
        """(compiled model, AsyncInferQueue, buffer pool) for raw input of `dtype` with runtime
        gain/offset and probabilities out, built on first use (under `run`'s lock, or at
        construction for float32)."""
        if dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype}")
        if dtype not in self._variants:
            model = _prepare(self._model, self.tile, self.batch_size, dtype, self.activation)
            shape_in = (self.batch_size, self.channels, self.tile, self.tile)
            self._variants[dtype] = self._compile(model, shape_in, dtype, "float32")
        return self._variants[dtype]

    def _mask_variant(self, dtype: str, gain: np.ndarray, offset: np.ndarray,
                      thresholds: np.ndarray, factor: int, scores: bool = False, batch: int | None = None):
        """The frame graph (`_prepare_masks`) for these constants at `batch` tiles per request
        (None: `batch_size`), compiled on first use; the last MASK_VARIANTS sets of constants stay
        compiled (a daemon sees one scale, so one set, in practice), with every batch size asked
        for them. `scores`: the variant with the tile scores output (only a `learning` policy
        asks: the plain variant's cost does not change)."""
        if dtype not in INPUT_DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype}")
        batch = self.batch_size if batch is None else int(batch)
        key = (dtype, gain.tobytes(), offset.tobytes(), thresholds.tobytes(), factor, bool(scores))
        if key not in self._mask_variants:
            while len(self._mask_variants) >= MASK_VARIANTS:
                self._mask_variants.pop(next(iter(self._mask_variants)))
            self._mask_variants[key] = {}
        by_batch = self._mask_variants[key]
        if batch not in by_batch:
            model = _prepare_masks(self._model, self.tile, batch, dtype, self.activation,
                                   gain, offset, thresholds, factor, scaling_inputs=self.precision == "int8",
                                   scores=scores, fold=self.precision in FOLD_PRECISIONS, core=self._core)
            side = self.tile * factor
            variant = self._compile(model, (batch, self.channels, side, side), dtype, "uint8",
                                    single=batch < self.batch_size)
            if len(variant[0].inputs) == 3:     # gain and offset as runtime inputs
                for request in variant[1]:
                    request.get_input_tensor(1).data[...] = gain.reshape(1, -1, 1, 1)
                    request.get_input_tensor(2).data[...] = offset.reshape(1, -1, 1, 1)
            by_batch[batch] = variant
        return by_batch[batch]

    @property
    def num_requests(self) -> int:
        return len(self._variant("float32")[1])

    def properties(self) -> dict:
        """What OpenVINO chose (streams, requests, precision), for status and benchmarks."""
        compiled, queue, _ = self._variant("float32")
        out = {"device": self.device, "batch_size": self.batch_size, "num_requests": len(queue),
               "precision": self.precision}
        for key in ("NUM_STREAMS", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT"):
            try:
                value = compiled.get_property(key)
            except RuntimeError:
                continue
            out[key.lower()] = ov.property_string(value)
        return out

    def layer_precisions(self) -> dict[str, list[str]]:
        """{layer type: precisions it executes at} in the compiled graph, e.g. Convolution:
        ["i8"] for an INT8 IR (its FakeQuantize nodes became int8 kernels)."""
        compiled = self._variant("float32")[0]
        out: dict[str, set[str]] = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "layerType" in rt and "runtimePrecision" in rt:
                out.setdefault(ov.rt_string(rt["layerType"]), set()).add(ov.rt_string(rt["runtimePrecision"]))
        return {k: sorted(v) for k, v in sorted(out.items())}

    # -- running -----------------------------------------------------------------------------
    def run(self, n_tiles: int, dtype: str, fill: Callable[[int, np.ndarray], None],
            on_output: Callable[[int, np.ndarray], None],
            gain: np.ndarray | None = None, offset: np.ndarray | None = None) -> None:
        """Stream `n_tiles` tiles through the queue, `batch_size` per request.

        `fill(start, buf)` writes tiles start .. start+len(buf)-1 into `buf` (a view of an input
        buffer OpenVINO reads without a copy, (n, C, t, t) of `dtype`). `on_output(start, probs)`
        gets their outputs (n, K, t, t) float32, a view valid only during the call. Both run in
        the calling thread while the requests keep inferring.
        """
        gain = np.ones(self.channels, np.float32) if gain is None else np.asarray(gain, np.float32)
        offset = np.zeros(self.channels, np.float32) if offset is None else np.asarray(offset, np.float32)
        if gain.shape != (self.channels,) or offset.shape != (self.channels,):
            raise ValueError(f"gain and offset need {self.channels} values (one per band), "
                             f"got {gain.shape} and {offset.shape}")
        with self._lock:
            _, queue, buffers = self._variant(dtype)
            for request in queue:           # all idle here: set this run's scaling once
                request.get_input_tensor(1).data[...] = gain.reshape(1, -1, 1, 1)
                request.get_input_tensor(2).data[...] = offset.reshape(1, -1, 1, 1)
            self._stream([(queue, buffers)], n_tiles, fill, on_output)

    def run_masks(self, n_tiles: int, dtype: str, fill: Callable[[int, np.ndarray], None],
                  on_output: Callable[..., None], gain: np.ndarray, offset: np.ndarray,
                  thresholds: np.ndarray, factor: int = 1, scores: bool = False) -> None:
        """Stream `n_tiles` raw tiles of (C, factor*tile, factor*tile) through the frame graph:
        `fill(start, buf)` as in `run`; `on_output(start, masks)` gets (n, tile, tile) uint8 class
        indices (shared.postprocess.threshold with `thresholds`, NaN: none) of the tiles binned
        `factor` x `factor`, a view valid only during the call. With `scores`,
        `on_output(start, masks, scores)`: also (n, 2) float32 per tile [mean normalised entropy,
        ambiguous share] (`_tile_scores`), a view as well."""
        gain, offset = np.asarray(gain, np.float32), np.asarray(offset, np.float32)
        thresholds = np.asarray(thresholds, np.float32)
        if gain.shape != (self.channels,) or offset.shape != (self.channels,):
            raise ValueError(f"gain and offset need {self.channels} values (one per band), "
                             f"got {gain.shape} and {offset.shape}")
        if thresholds.shape != (self.num_classes,):
            raise ValueError(f"{thresholds.size} thresholds for {self.num_classes} classes")
        with self._lock:
            lanes = [self._mask_variant(dtype, gain, offset, thresholds, int(factor), scores)[1:]]
            if n_tiles % self.batch_size:   # the last tiles through a one-tile variant
                lanes.append(self._mask_variant(dtype, gain, offset, thresholds, int(factor), scores, 1)[1:])
            if scores:
                self._stream(lanes, n_tiles, fill, lambda start, out, extra: on_output(start, out[:, 0], extra))
            else:
                self._stream(lanes, n_tiles, fill, lambda start, out: on_output(start, out[:, 0]))

    @staticmethod
    def _stream(lanes: list[tuple], n_tiles: int, fill: Callable, on_output: Callable) -> None:
        """Batches through the queue of `lanes[0]` ((queue, buffers)), each cut by `fill` into a
        free input buffer and handed to the next idle request; each finished one to `on_output`
        while the others infer (with a second output: `on_output(start, out, extra)`). With a
        second lane (a one-tile variant), the `n_tiles % batch` tiles left after the whole batches
        go through it, one per request, beside the first lane's last batches: a static batch
        would compute a whole batch for them (81 tiles at batch 2: 82 computed, and the request
        with the half-empty last batch finishing one batch after the other)."""
        # No Python callback on the queue: OpenVINO's own marks requests idle in completion
        # order, and we collect a finished request's output when get_idle_request_id hands
        # it back. (A Python callback makes OpenVINO threads take the GIL; destroying such a
        # queue can then deadlock: openvinotoolkit/openvino#37073.)
        # Input and output memory rotates through a pool one larger than the queue: the next
        # batch is cut into a free input buffer before a request is free, a free request gets
        # it and a fresh output buffer and starts at once, and only then is the output it had
        # finished post-processed, while it runs again.
        batch = lanes[0][1].inputs[0].shape[0]
        whole = n_tiles - n_tiles % batch if len(lanes) > 1 else n_tiles
        jobs = [(start, min(batch, n_tiles - start), 0) for start in range(0, whole, batch)]
        jobs += [(start, 1, 1) for start in range(whole, n_tiles)]
        free_in = [list(range(len(buffers.inputs))) for _, buffers in lanes]
        free_out = [list(range(len(buffers.outputs))) for _, buffers in lanes]
        pending: list[dict[int, tuple[int, int, int, int]]] = [{} for _ in lanes]  # request -> job

        def collect(lane: int, job: tuple[int, int, int, int]) -> None:
            start, count, i, o = job
            buffers = lanes[lane][1]
            if buffers.extras is None:
                on_output(start, buffers.outputs[o][:count])
            else:
                on_output(start, buffers.outputs[o][:count], buffers.extras[o][:count])
            free_in[lane].append(i)
            free_out[lane].append(o)

        try:
            for start, count, lane in jobs:
                queue, buffers = lanes[lane]
                i = free_in[lane].pop()
                fill(start, buffers.inputs[i][:count])
                rid = queue.get_idle_request_id()    # start_async takes this same request
                finished = pending[lane].pop(rid, None)
                o = free_out[lane].pop()
                request = queue[rid]
                request.set_input_tensor(0, buffers.input_tensors[i])
                request.set_output_tensor(0, buffers.output_tensors[o])
                if buffers.extras is not None:
                    request.set_output_tensor(1, buffers.extra_tensors[o])
                queue.start_async()
                pending[lane][rid] = (start, count, i, o)
                if finished is not None:
                    collect(lane, finished)
            for lane, (queue, _) in enumerate(lanes):
                queue.wait_all()
                for job in sorted(pending[lane].values()):
                    collect(lane, job)
        finally:
            for queue, _ in lanes:      # never leave a request writing into a buffer we dropped
                queue.wait_all()
            for jobs_out in pending:
                jobs_out.clear()

    def infer(self, tiles: np.ndarray, gain: np.ndarray | None = None,
              offset: np.ndarray | None = None) -> np.ndarray:
        """(N, C, t, t) tiles -> (N, K, t, t) float32 outputs (after the activation)."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.channels, self.tile, self.tile):
            raise ValueError(f"tiles must be (N, {self.channels}, {self.tile}, {self.tile}), got {tiles.shape}")
        dtype = tiles.dtype.name
        out = np.full((len(tiles), self.num_classes, self.tile, self.tile), np.nan, np.float32)

        def fill(start: int, buf: np.ndarray) -> None:
            buf[...] = tiles[start:start + len(buf)]

        def on_output(start: int, probs: np.ndarray) -> None:
            out[start:start + len(probs)] = probs

        self.run(len(tiles), dtype, fill, on_output, gain, offset)
        return out

    def infer_masks(self, tiles: np.ndarray, gain: np.ndarray, offset: np.ndarray,
                    thresholds: np.ndarray, scores: bool = False):
        """(N, C, t, t) tiles -> (N, t, t) uint8 class masks through the frame graph (unbinned);
        with `scores`, (masks, (N, 2) float32 tile scores)."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.channels, self.tile, self.tile):
            raise ValueError(f"tiles must be (N, {self.channels}, {self.tile}, {self.tile}), got {tiles.shape}")
        out = np.zeros((len(tiles), self.tile, self.tile), np.uint8)
        tile_scores = np.full((len(tiles), SCORES), np.nan, np.float32)

        def fill(start: int, buf: np.ndarray) -> None:
            buf[...] = tiles[start:start + len(buf)]

        def on_output(start: int, masks: np.ndarray, extra: np.ndarray | None = None) -> None:
            out[start:start + len(masks)] = masks
            if extra is not None:
                tile_scores[start:start + len(extra)] = extra

        self.run_masks(len(tiles), tiles.dtype.name, fill, on_output, gain, offset, thresholds,
                       scores=scores)
        return (out, tile_scores) if scores else out
