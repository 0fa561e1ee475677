"""Tensors and metadata on the wire, and the validation gate every incoming tensor passes.

A message is a stream of hivemind `ExpertRequest` (or `ExpertResponse`) parts: the first part carries msgpack
metadata; the tensors follow in <= 1 MiB parts (`split_for_streaming`), a part with `dtype` set starting a new
tensor. No `.proto` of our own. Decoding enforces a byte cap, a per-part timeout and a deadline while the
stream arrives, and hooks let the receiver check the sender on the first part, so an oversized, stalling or
unauthorised sender costs at most the cap, the timeout or one part. Every failure becomes
`InvalidPayload(reason)`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import msgpack
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from cfnode.errors import InvalidPayload
from cfnode.net import wire

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
    message_type: type[Message], meta: dict[str, Any], tensors: Iterable[torch.Tensor], chunk_bytes: int,
    wire_dtype: str = "float32",
) -> Iterator[Message]:
    """Yield the stream parts of one message: metadata first, then every tensor in <= chunk_bytes parts, in the
    wire dtype (net/wire.py; float32 is exact)."""
    parts: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        serialized = wire.encode(tensor, wire_dtype)
        parts.extend(split_for_streaming(serialized, chunk_bytes))
    if not parts:
        yield message_type(metadata=pack_metadata(meta))
        return
    yield message_type(metadata=pack_metadata(meta), tensors=[parts[0]])
    for part in parts[1:]:
        yield message_type(tensors=[part])


def declared_bytes(part: runtime_pb2.Tensor) -> int:
    """The byte size a tensor's first stream part declares (its shape times its dtype's width)."""
    numel = math.prod(int(s) for s in part.size) if part.size else 1
    return numel * _DTYPE_BYTES.get(part.dtype, 8)


OnMeta = Callable[[dict[str, Any]], Awaitable[int | None]]
OnHeader = Callable[[int, runtime_pb2.Tensor], None]
OnFirstPart = Callable[[dict[str, Any], list[torch.Tensor]], Awaitable[None]]


async def read_message(
    stream: AsyncIterator[Message], *, max_bytes: int, on_meta: OnMeta | None = None,
    on_header: OnHeader | None = None, on_first_part: OnFirstPart | None = None,
    part_timeout_s: float | None = None, deadline_s: float | None = None, stats: dict[str, int] | None = None,
    check: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Consume a message stream: (metadata, tensors). Raises InvalidPayload; stops reading at the byte cap.

    The hooks let a receiver reject a message as early as it can tell, so a bad sender costs one part and not
    the stream: `on_meta(meta)` is awaited as soon as the first part's metadata is decoded and may return a
    tighter byte cap for the rest; `on_header(index, part)` sees each tensor's first part before its bytes are
    counted; `on_first_part(meta, tensors)` is awaited once the first part is consumed, with the tensors it
    completed (a tensor of up to one chunk travels whole in the first part). Each part must arrive within
    `part_timeout_s` and the whole stream within `deadline_s` (loop time), else `timeout`. `stats["bytes"]`
    gets the tensor bytes read. `check(tensor)` (validation: it returns the tensor to keep or raises
    InvalidPayload) sees every decoded tensor, in the same worker call as its decoding: a tensor of at least
    `OFFLOAD_BYTES` is decoded and checked in the loop's default executor, off the event loop, so the loop keeps
    serving other streams meanwhile.
    Exceptions other than InvalidPayload raised by a hook propagate unchanged."""
    loop = asyncio.get_running_loop()
    deadline = None if deadline_s is None else loop.time() + deadline_s
    it = aiter(stream)
    meta: dict[str, Any] | None = None
    groups: list[list[runtime_pb2.Tensor]] = []
    tensors: list[torch.Tensor] = []  # decoded, one per complete group, in order
    received = 0
    while True:
        message = await _next_part(it, loop, part_timeout_s, deadline)
        if message is None:
            break
        first = meta is None
        if meta is None:
            meta = unpack_metadata(message.metadata)
            if on_meta is not None:
                cap = await on_meta(meta)
                if cap is not None:
                    max_bytes = min(max_bytes, cap)
        for part in message.tensors:
            if part.dtype:
                if on_header is not None:
                    on_header(len(groups), part)
                if declared_bytes(part) > max_bytes:
                    raise InvalidPayload("too_large", f"declared tensor {list(part.size)[:8]} {part.dtype[:40]} "
                                                      f"exceeds {max_bytes} bytes")
                if len(tensors) < len(groups):  # the previous tensor is still open: it ends here
                    tensors.append(await _decoded(groups[-1], check, complete=False))
                groups.append([part])
            elif groups and len(tensors) < len(groups):
                groups[-1].append(part)
            elif groups:
                raise InvalidPayload("decode", f"tensor stream has more parts than the {groups[-1][0].chunks} "
                                               "it declared")
            else:
                raise InvalidPayload("decode", "tensor continuation part before any tensor header")
            received += len(part.buffer)
            if stats is not None:
                stats["bytes"] = received
            if received > max_bytes:
                raise InvalidPayload("too_large", f"stream exceeds the {max_bytes}-byte cap")
            group = groups[-1]
            if group[0].chunks and len(group) == group[0].chunks:
                tensors.append(await _decoded(group, check, complete=True))
        if first and on_first_part is not None:
            await on_first_part(meta, list(tensors))
    if meta is None:
        raise InvalidPayload("decode", "empty stream")
    if len(tensors) < len(groups):
        tensors.append(await _decoded(groups[-1], check, complete=False))
    return meta, tensors


OFFLOAD_BYTES = 8 * 1024 * 1024
"""Tensors at least this large are decoded (and checked) off the event loop. Measured (bench/README.md,
2026-12-03, small, L = 4, 1 MiB hops): offloading every hop tensor of 64 KiB or more made the swarm 11 % slower
(1496 against 1679 tokens/s), since a worker thread contends for the GIL with the loop and the compute thread,
so hops of that size are decoded inline; only tensors whose decoding would hold the loop for tens of ms go to
a thread."""


async def _decoded(group: list[runtime_pb2.Tensor], check: Callable[[torch.Tensor], torch.Tensor] | None, *,
                   complete: bool) -> torch.Tensor:
    """One tensor from its parts, checked. `complete=False`: its parts ended without the count it declared,
    which is fine without a count and a truncated stream with one."""
    if not complete and group[0].chunks:
        raise InvalidPayload("decode", f"tensor stream truncated: {len(group)} of {group[0].chunks} parts")
    if sum(len(part.buffer) for part in group) >= OFFLOAD_BYTES:
        return await asyncio.to_thread(_decode_checked, group, check)
    return _decode_checked(group, check)


def _decode_checked(group: list[runtime_pb2.Tensor],
                    check: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    tensor = _decode(group)
    return tensor if check is None else check(tensor)


async def _next_part(it: AsyncIterator[Message], loop: asyncio.AbstractEventLoop, part_timeout_s: float | None,
                     deadline: float | None) -> Message | None:
    """The next part of a stream, None at its end; a stall or a transport error becomes InvalidPayload."""
    timeout = part_timeout_s
    if deadline is not None:
        left = deadline - loop.time()
        if left <= 0:
            raise InvalidPayload("timeout", "stream exceeded its deadline")
        timeout = left if timeout is None else min(timeout, left)
    try:
        async with asyncio.timeout(timeout):
            return await anext(it)
    except StopAsyncIteration:
        return None
    except TimeoutError as e:
        if part_timeout_s is not None and timeout == part_timeout_s:
            raise InvalidPayload("timeout", f"stream stalled: no part within {part_timeout_s:g} s") from e
        raise InvalidPayload("timeout", "stream exceeded its deadline") from e
    except InvalidPayload:
        raise
    except Exception as e:  # protobuf DecodeError and friends surface while iterating
        raise InvalidPayload("decode", f"malformed stream: {type(e).__name__}: {e}") from e


def _decode(group: list[runtime_pb2.Tensor]) -> torch.Tensor:
    try:
        return wire.decode(combine_from_streaming(group))
    except Exception as e:  # RuntimeError / ValueError / TypeError from torch or numpy
        raise InvalidPayload("decode", f"cannot decode tensor: {type(e).__name__}: {e}") from e


def validate_header(part: runtime_pb2.Tensor, *, shape: tuple[int, ...], dtype: str, name: str,
                    compression: int = runtime_pb2.NONE) -> None:
    """A tensor's first stream part, before its bytes: a dtype cfnode knows (else `decode`), the exact shape,
    the dtype and its compression; the same reasons `validate_tensor` gives for the decoded tensor."""
    if part.dtype not in _DTYPE_BYTES:
        raise InvalidPayload("decode", f"{name}: unknown dtype {part.dtype[:40]!r}")
    if tuple(int(s) for s in part.size) != tuple(shape):
        raise InvalidPayload("shape", f"{name}: expected shape {list(shape)}, got {list(part.size)[:8]}")
    if part.dtype != dtype:
        raise InvalidPayload("dtype", f"{name}: expected {dtype}, got {part.dtype}")
    if part.compression != compression:
        raise InvalidPayload("dtype", f"{name}: expected compression {runtime_pb2.CompressionType.Name(compression)}, "
                                      f"got {part.compression}")


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
