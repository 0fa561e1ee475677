"""Tensors and metadata on the wire, and the validation gate every incoming tensor passes.

A message is a stream of hivemind `ExpertRequest` (or `ExpertResponse`) parts: the first part carries msgpack
metadata; the tensors follow in <= 1 MiB parts (`split_for_streaming`), a part with `dtype` set starting a new
tensor. No `.proto` of our own. Decoding enforces a byte cap while the stream arrives, so an oversized or
lying sender costs at most the cap. Every failure becomes `InvalidPayload(reason)`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, TypeVar

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from cfnode.errors import InvalidPayload

Message = TypeVar("Message", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1,
                "int8": 1, "bool": 1, "int16": 2}
MAX_METADATA_BYTES = 64 * 1024


def pack_metadata(meta: dict[str, Any]) -> bytes:
    return msgpack.packb(meta, use_bin_type=True)


def unpack_metadata(blob: bytes) -> dict[str, Any]:
    if len(blob) > MAX_METADATA_BYTES:
        raise InvalidPayload("too_large", f"metadata of {len(blob)} bytes")
    try:
        meta = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidPayload("decode", f"metadata is not msgpack: {e}") from e
    if not isinstance(meta, dict):
        raise InvalidPayload("decode", "metadata is not a map")
    return meta


def iter_message_parts(
    message_type: type[Message], meta: dict[str, Any], tensors: Iterable[torch.Tensor], chunk_bytes: int
) -> Iterator[Message]:
    """Yield the stream parts of one message: metadata first, then every tensor in <= chunk_bytes parts."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        serialized = serialize_torch_tensor(tensor.detach().cpu().contiguous())
        parts.extend(split_for_streaming(serialized, chunk_bytes))
    if not parts:
        yield message_type(metadata=pack_metadata(meta))
        return
    yield message_type(metadata=pack_metadata(meta), tensors=[parts[0]])
    for part in parts[1:]:
        yield message_type(tensors=[part])


def _declared_bytes(part: runtime_pb2.Tensor) -> int:
    numel = math.prod(int(s) for s in part.size) if part.size else 1
    return numel * _DTYPE_BYTES.get(part.dtype, 8)


async def read_message(
    stream: AsyncIterator[Message], *, max_bytes: int
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Consume a message stream: (metadata, tensors). Raises InvalidPayload; stops reading at the byte cap."""
    meta: dict[str, Any] | None = None
    groups: list[list[runtime_pb2.Tensor]] = []
    received = 0
    try:
        async for message in stream:
            if meta is None:
                meta = unpack_metadata(message.metadata)
            for part in message.tensors:
                received += len(part.buffer)
                if received > max_bytes:
                    raise InvalidPayload("too_large", f"stream exceeds the {max_bytes}-byte cap")
                if part.dtype:
                    if _declared_bytes(part) > max_bytes:
                        raise InvalidPayload(
                            "too_large", f"declared tensor {list(part.size)} {part.dtype} exceeds {max_bytes} bytes"
                        )
                    groups.append([part])
                elif groups:
                    groups[-1].append(part)
                else:
                    raise InvalidPayload("decode", "tensor continuation part before any tensor header")
    except InvalidPayload:
        raise
    except Exception as e:  # protobuf DecodeError and friends surface while iterating
        raise InvalidPayload("decode", f"malformed stream: {type(e).__name__}: {e}") from e
    if meta is None:
        raise InvalidPayload("decode", "empty stream")
    tensors = []
    for group in groups:
        if group[0].chunks and len(group) != group[0].chunks:
            raise InvalidPayload("decode", f"tensor stream truncated: {len(group)} of {group[0].chunks} parts")
        try:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(group)))
        except Exception as e:  # RuntimeError / ValueError / TypeError from torch or numpy
            raise InvalidPayload("decode", f"cannot decode tensor: {type(e).__name__}: {e}") from e
    return meta, tensors


def validate_tensor(tensor: torch.Tensor, *, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> None:
    """The gate for activations and gradients: exact shape (a same-numel reshape is still wrong), dtype, finite."""
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidPayload("shape", f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.dtype != dtype:
        raise InvalidPayload("dtype", f"{name}: expected {dtype}, got {tensor.dtype}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidPayload("nonfinite", f"{name}: contains NaN or Inf")


def require_fields(meta: dict[str, Any], spec: dict[str, type | tuple[type, ...]]) -> None:
    """Check that metadata has the given fields with the given types."""
    for key, typ in spec.items():
        if key not in meta:
            raise InvalidPayload("decode", f"metadata lacks {key!r}")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise InvalidPayload("decode", f"metadata field {key!r} has type {type(meta[key]).__name__}")
