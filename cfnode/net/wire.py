"""How a hop's tensor travels: the run's `--wire-dtype` (docs/protocol.md "Wire dtypes"). Activations and
gradients are float32 on both ends; on the wire they are

| wire dtype | hivemind serialization | header `dtype`, `compression` | bytes per value |
|---|---|---|---|
| `float32` | `NONE` | `float32`, `NONE` | 4 |
| `float16` | `FLOAT16` (hivemind's, clamped to float16's range) | `float32`, `FLOAT16` | 2 |
| `bfloat16` | the bfloat16 bits as `int16`, `NONE` | `int16`, `NONE` | 2 |
| `uint8` | `UNIFORM_8BIT` (hivemind's: 256 buckets over 6 sigma, a float32 codebook of bucket means) | `float32`, `UNIFORM_8BIT` | 1 (+ 1032 per tensor) |

Two places where hivemind 1.1.12 cannot serve as is, measured: it serializes a bfloat16 tensor as float32
(32768 bytes for 8192 values, the same as float32), so the bfloat16 bits go as int16 (16384); and its 8-bit
quantizers' `extract` calls `int()` on a one-element array, which numpy >= 2 refuses (`TypeError: only
0-dimensional arrays can be converted to Python scalars`), so `decode` reads that (documented, three-field)
format itself; the encoding is hivemind's. `BLOCKWISE_8BIT` needs bitsandbytes, which cfnode does not install.
Weights (rebuilds, replicas, exact joins) always travel exactly, as float32 `NONE`.
"""

from __future__ import annotations

import math
import struct

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from cfnode.config import WIRE_DTYPES

_COMPRESSION = {"float32": runtime_pb2.NONE, "float16": runtime_pb2.FLOAT16, "bfloat16": runtime_pb2.NONE,
                "uint8": runtime_pb2.UNIFORM_8BIT}
_HEADER_DTYPE = {"float32": "float32", "float16": "float32", "bfloat16": "int16", "uint8": "float32"}


def check_wire_dtype(name: str) -> str:
    if name not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {name!r} (choose from {', '.join(WIRE_DTYPES)})")
    return name


def encode(tensor: torch.Tensor, wire_dtype: str = "float32") -> runtime_pb2.Tensor:
    """A float32 tensor as one serialized hivemind tensor in the run's wire dtype."""
    t = tensor.detach().cpu().contiguous()
    if wire_dtype == "bfloat16":
        return serialize_torch_tensor(t.to(torch.bfloat16).view(torch.int16))
    return serialize_torch_tensor(t, _COMPRESSION[check_wire_dtype(wire_dtype)])


def header(wire_dtype: str) -> tuple[str, int]:
    """(dtype, compression) the first part of a hop's tensor must declare in this wire dtype."""
    return _HEADER_DTYPE[wire_dtype], _COMPRESSION[wire_dtype]


def decode(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    """hivemind's deserialization; its `UNIFORM_8BIT` format (int64 codebook size, float32 codebook, one uint8
    bucket index per value) is read here, since hivemind's own reader fails under numpy >= 2."""
    if serialized.compression == runtime_pb2.UNIFORM_8BIT:
        return _decode_8bit(serialized)
    return deserialize_torch_tensor(serialized)


def _decode_8bit(serialized: runtime_pb2.Tensor) -> torch.Tensor:
    buffer, shape = serialized.buffer, tuple(int(s) for s in serialized.size)
    (size,) = struct.unpack_from("<q", buffer, 0) if len(buffer) >= 8 else (-1,)
    numel = math.prod(shape)
    if not 0 < size <= 256 or len(buffer) != 8 + 4 * size + numel:
        raise ValueError(f"an 8-bit tensor of {len(buffer)} bytes with a codebook of {size} for {numel} values")
    codebook = torch.frombuffer(bytearray(buffer[8:8 + 4 * size]), dtype=torch.float32)
    indices = torch.frombuffer(bytearray(buffer[8 + 4 * size:]), dtype=torch.uint8).long()
    if numel and int(indices.max()) >= size:
        raise ValueError("an 8-bit tensor indexes past its codebook")
    return codebook[indices].reshape(shape)


def to_float32(tensor: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """A decoded hop tensor back to float32 (bfloat16: its int16 bits reinterpreted first)."""
    if wire_dtype == "bfloat16" and tensor.dtype == torch.int16:
        return tensor.view(torch.bfloat16).float()
    return tensor.float() if tensor.dtype != torch.float32 else tensor
