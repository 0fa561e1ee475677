"""Where a node computes and in which precision: `--device` and `--compute-dtype` (docs/operations.md).

`parse_device` and `resolve_device` are pure (no torch import, no probing): the CLI probes the machine once
(`probe_device`) and the frozen config then holds a concrete device ("cpu", "cuda:N", "mps"; "meta" for tests).
Weights, Adam state and compute live on that device; every tensor that crosses the event loop or the wire, and
every snapshot or state copy, is on the CPU (StageWorker moves at its boundary).

Mixed precision keeps float32 master weights and optimizer state and runs forward passes under
`torch.autocast(dtype=compute_dtype)`. float16 uses a STATIC, run-wide loss scale (`loss_scale`): stage 0
multiplies the loss by it, every stage divides its gradient by it before clipping; an overflow makes the
gradient non-finite and the swarm skips that step (the existing non-finite path), so every stage agrees
without exchanging a dynamic scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cfnode.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""What `--device` accepts (plus `meta`, torch's shape-only device, for tests)."""
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
FLOAT16_LOSS_SCALE = 2.0 ** 10
"""The static loss scale of `--compute-dtype float16` (a power of two: scaling and unscaling are exact)."""


def parse_device(text: str) -> str:
    """The canonical spelling of a device request: auto, cpu, meta, mps, cuda (any CUDA device) or cuda:N.
    Raises ConfigError (one line naming --device) for anything else."""
    value = str(text).strip().lower()
    if value in ("auto", "cpu", "meta", "mps", "cuda"):
        return value
    head, sep, index = value.partition(":")
    if head == "cuda" and sep and index.isdigit():
        return f"cuda:{int(index)}"
    raise ConfigError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {text!r}")


def resolve_device(requested: str, *, cuda_available: bool, cuda_count: int, mps_available: bool) -> str:
    """The concrete device for `requested` on a machine with the given accelerators: `auto` is the first CUDA
    device, else MPS, else the CPU; `cuda` is cuda:0. A requested device that is absent raises ConfigError."""
    value = parse_device(requested)
    if value == "auto":
        if cuda_available and cuda_count > 0:
            return "cuda:0"
        return "mps" if mps_available else "cpu"
    if value in ("cpu", "meta"):
        return value
    if value == "mps":
        if not mps_available:
            raise ConfigError("--device mps: Apple's MPS backend is not available on this machine "
                              "(use --device auto or cpu)")
        return value
    if not cuda_available or cuda_count < 1:
        raise ConfigError(f"--device {value}: CUDA is not available on this machine (use --device auto or cpu)")
    index = 0 if value == "cuda" else int(value.split(":")[1])
    if index >= cuda_count:
        raise ConfigError(f"--device {value}: this machine has {cuda_count} CUDA device(s), cuda:0.."
                          f"cuda:{cuda_count - 1}")
    return f"cuda:{index}"


def probe_device(requested: str) -> str:
    """`resolve_device` on this machine (imports torch unless the request is the CPU or meta)."""
    value = parse_device(requested)
    if value in ("cpu", "meta"):
        return value
    import torch

    cuda = bool(torch.cuda.is_available())
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    return resolve_device(value, cuda_available=cuda, cuda_count=torch.cuda.device_count() if cuda else 0,
                          mps_available=mps)


def check_compute_dtype(name: str) -> str:
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return name


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a `--compute-dtype` name (a dtype passes through)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[check_compute_dtype(name)]


def loss_scale(compute_dtype: str | torch.dtype) -> float:
    """The run-wide static loss scale of a compute dtype: FLOAT16_LOSS_SCALE for float16, else 1."""
    import torch

    return FLOAT16_LOSS_SCALE if torch_dtype(compute_dtype) == torch.float16 else 1.0
