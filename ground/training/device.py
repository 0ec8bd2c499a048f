"""Where and at what precision torch runs: one place for every stage that trains or infers.

- `resolve_device("auto")`: CUDA when present, else the CPU; "cpu", "cuda", "cuda:1" as given, and a
  clear error (DeviceError) naming the devices there are when the asked one is not.
- `Precision`: "fp32", "bf16", "fp16" or "auto" (bf16 on a GPU that has it, else fp16 on a GPU, fp32
  on the CPU). bf16/fp16 run the forward under `torch.autocast`; fp16 also needs a GradScaler (its
  5-bit exponent underflows small gradients), bf16 does not (fp32's exponent).
- Batches go to the device from pinned memory with non-blocking copies; on CUDA, models run
  channels-last (NHWC: what tensor cores and cuDNN's fast convolutions want; on the CPU oneDNN
  reorders anyway, so it does not pay there).
- `out_of_memory(batch)`: a CUDA out-of-memory becomes DeviceOutOfMemory naming the batch size.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ground.errors import DeviceError, DeviceOutOfMemory

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch.device from a config value; refuses a device this machine does not have."""
    spec = "auto" if spec is None else str(spec)
    local = os.environ.get("LOCAL_RANK")          # under torchrun: this process's GPU
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local is not None and torch.cuda.is_available():
        spec = f"cuda:{int(local) % torch.cuda.device_count()}"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"device {spec!r} is not a device name; use auto, cpu, cuda or cuda:N "
                          f"(here: {', '.join(available_devices())})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise DeviceError(f"device {spec!r}: no CUDA device on this machine (here: cpu); use device = \"auto\" "
                              "or \"cpu\"")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {spec!r}: this machine has {n} CUDA device(s) "
                              f"({', '.join(available_devices()[1:])})")
        return dev
    raise DeviceError(f"device {spec!r}: only cpu and cuda are supported (here: {', '.join(available_devices())})")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision 'fp16' trains on CUDA only (the CPU has no fp16 autocast worth its "
                          "error); use 'bf16' or 'fp32' on the CPU")
    return precision


@dataclass
class Placement:
    """A device and a precision: autocast, grad scaler, batch copies and model layout from one object."""
    device: torch.device
    precision: str = "fp32"

    @classmethod
    def of(cls, device="auto", precision: str = "fp32") -> "Placement":
        dev = resolve_device(device)
        return cls(dev, resolve_precision(precision, dev))

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only; a disabled scaler passes losses and steps through unchanged."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cuda else model

    def batch(self, *tensors):
        """The tensors on the device (None stays None): pinned, copied without blocking the host."""
        out = []
        for t in tensors:
            if t is None or not self.cuda:
                out.append(t)
                continue
            t = t.pin_memory() if not t.is_pinned() else t
            fmt = torch.channels_last if t.dim() == 4 and t.is_floating_point() else torch.contiguous_format
            out.append(t.to(self.device, non_blocking=True, memory_format=fmt))
        return out

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        return f"{self.device} ({name}), {self.precision}"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@contextmanager
def out_of_memory(batch: int, where: str = "training", device: torch.device | None = None):
    """Turn an out-of-memory inside the block into DeviceOutOfMemory naming the batch size."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise DeviceOutOfMemory(f"{where}: {device or 'the device'} ran out of memory at batch size {batch}; "
                                f"lower train.batch (or train.crop), or use precision = \"bf16\"",
                                batch=batch) from None
