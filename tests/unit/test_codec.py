"""Tensors and metadata on the wire (cfnode.net.codec): streaming round trips, byte caps, the validation gate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgpack
import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2

from cfnode.errors import InvalidPayload
from cfnode.net.codec import (
    MAX_METADATA_BYTES,
    OFFLOAD_BYTES,
    iter_message_parts,
    pack_metadata,
    read_message,
    require_fields,
    unpack_metadata,
    validate_header,
    validate_tensor,
)

Request = runtime_pb2.ExpertRequest
BIG_CAP = 1 << 24


async def _agen(parts: Iterable[Any]) -> AsyncIterator[Any]:
    for p in parts:
        yield p


def read(parts: Iterable[Any], max_bytes: int = BIG_CAP) -> tuple[dict[str, Any], list[torch.Tensor]]:
    return asyncio.run(read_message(_agen(list(parts)), max_bytes=max_bytes))


def reason_of(parts: Iterable[Any], max_bytes: int = BIG_CAP) -> str:
    with pytest.raises(InvalidPayload) as exc:
        read(parts, max_bytes)
    return exc.value.reason


META = {"run": "r", "step": 3, "mb": 1, "generation": 2, "stage": 1, "nested": {"a": [1, 2.5, "x"]},
        "blob": b"\x00\x01"}


# -- round trips --------------------------------------------------------------------------------------------


def test_round_trip_one_tensor_several_parts() -> None:
    t = torch.randn(4, 16, 8)  # 2048 bytes
    chunk = 300
    parts = list(iter_message_parts(Request, META, [t], chunk))
    assert len(parts) == -(-t.numel() * 4 // chunk)  # ceil(2048 / 300) = 7
    assert all(len(part.buffer) <= chunk for msg in parts for part in msg.tensors)
    assert parts[0].metadata and all(not msg.metadata for msg in parts[1:])
    meta, tensors = read(parts)
    assert meta == META
    assert len(tensors) == 1
    assert tensors[0].dtype == torch.float32
    assert torch.equal(tensors[0], t)


def test_round_trip_several_tensors_mixed_dtypes() -> None:
    a = torch.randn(3, 50)
    b = torch.arange(-40, 40, dtype=torch.int64).reshape(8, 10)
    c = torch.randn(7)
    chunk = 64
    parts = list(iter_message_parts(Request, {"k": 1}, [a, b, c], chunk))
    buffers = [part.buffer for msg in parts for part in msg.tensors]
    assert all(len(buf) <= chunk for buf in buffers)
    assert sum(len(buf) for buf in buffers) == a.numel() * 4 + b.numel() * 8 + c.numel() * 4
    headers = [part.dtype for msg in parts for part in msg.tensors if part.dtype]
    assert headers == ["float32", "int64", "float32"]
    meta, tensors = read(parts)
    assert meta == {"k": 1}
    assert [x.dtype for x in tensors] == [torch.float32, torch.int64, torch.float32]
    for got, want in zip(tensors, [a, b, c], strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_round_trip_non_contiguous_and_grad_tensor() -> None:
    t = torch.randn(6, 5, requires_grad=True)
    view = t.t()  # non-contiguous, part of a graph
    _, tensors = read(iter_message_parts(Request, {}, [view], 16))
    assert torch.equal(tensors[0], view.detach())
    assert not tensors[0].requires_grad


def test_metadata_only_message() -> None:
    parts = list(iter_message_parts(Request, META, [], 1024))
    assert len(parts) == 1 and not parts[0].tensors
    assert read(parts) == (META, [])


def test_response_type_round_trip() -> None:
    t = torch.ones(10)
    parts = list(iter_message_parts(runtime_pb2.ExpertResponse, {"ok": True}, [t], 8))
    assert all(isinstance(p, runtime_pb2.ExpertResponse) for p in parts)
    meta, tensors = read(parts)
    assert meta == {"ok": True} and torch.equal(tensors[0], t)


def test_pack_unpack_metadata() -> None:
    assert unpack_metadata(pack_metadata(META)) == META


# -- malformed streams --------------------------------------------------------------------------------------


def test_empty_stream_is_decode() -> None:
    assert reason_of([]) == "decode"


@pytest.mark.parametrize("blob", [b"\xc1", b"\x92\x01", b"", msgpack.packb(5), msgpack.packb([1, 2]),
                                  msgpack.packb("a map?"), msgpack.packb({1: "int key"})])
def test_garbage_metadata_is_decode(blob: bytes) -> None:
    assert reason_of([Request(metadata=blob)]) == "decode"
    with pytest.raises(InvalidPayload) as exc:
        unpack_metadata(blob)
    assert exc.value.reason == "decode"


def test_oversized_metadata_is_too_large() -> None:
    blob = pack_metadata({"pad": "x" * (MAX_METADATA_BYTES + 1)})
    assert reason_of([Request(metadata=blob)]) == "too_large"


def test_byte_cap_exceeded_while_streaming() -> None:
    t = torch.zeros(1000)  # 4000 bytes
    parts = list(iter_message_parts(Request, {}, [t], 500))
    assert read(parts, max_bytes=4000)[1][0].numel() == 1000  # exactly at the cap is fine

    consumed = 0

    async def counting() -> AsyncIterator[Any]:
        nonlocal consumed
        for p in parts:
            consumed += 1
            yield p

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(counting(), max_bytes=1200))
    assert exc.value.reason == "too_large"
    assert consumed < len(parts)  # stopped reading at the cap, did not drain the stream


def test_cap_exceeded_by_sum_of_tensors() -> None:
    parts = list(iter_message_parts(Request, {}, [torch.zeros(100), torch.zeros(100)], 1 << 20))
    assert reason_of(parts, max_bytes=700) == "too_large"


def test_huge_declared_tensor_is_too_large_without_allocating() -> None:
    header = runtime_pb2.Tensor(compression=runtime_pb2.CompressionType.NONE, buffer=b"\x00" * 16,
                                size=[10**6, 10**6], dtype="float32", chunks=1)
    # if the decoder tried to materialise 4 TB it would fail with MemoryError (-> "decode") or hang
    assert reason_of([Request(metadata=pack_metadata({}), tensors=[header])], max_bytes=1 << 20) == "too_large"


def test_continuation_before_header_is_decode() -> None:
    orphan = runtime_pb2.Tensor(buffer=b"\x00" * 8)
    assert reason_of([Request(metadata=pack_metadata({}), tensors=[orphan])]) == "decode"
    assert reason_of([Request(metadata=pack_metadata({})), Request(tensors=[orphan])]) == "decode"


def test_truncated_buffer_is_decode() -> None:
    parts = list(iter_message_parts(Request, {}, [torch.randn(64)], 100))  # 256 bytes -> 3 parts
    assert len(parts) == 3
    assert reason_of(parts[:-1]) == "decode"  # last chunk missing
    serialized = serialize_torch_tensor(torch.randn(8, 8))
    chopped = runtime_pb2.Tensor()
    chopped.CopyFrom(serialized)
    chopped.buffer = serialized.buffer[:-3]  # not even a whole element
    assert reason_of([Request(metadata=pack_metadata({}), tensors=[chopped])]) == "decode"


def test_bad_dtype_string_is_decode() -> None:
    serialized = serialize_torch_tensor(torch.randn(4))
    bad = runtime_pb2.Tensor()
    bad.CopyFrom(serialized)
    bad.dtype = "not_a_dtype"
    assert reason_of([Request(metadata=pack_metadata({}), tensors=[bad])]) == "decode"


def test_stream_raising_midway_is_decode() -> None:
    async def broken() -> AsyncIterator[Any]:
        yield Request(metadata=pack_metadata({}))
        raise RuntimeError("connection reset")

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(broken(), max_bytes=BIG_CAP))
    assert exc.value.reason == "decode"


# -- validate_tensor ----------------------------------------------------------------------------------------


def _reason(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidPayload) as exc:
        fn(*args, **kwargs)
    return exc.value.reason


def test_validate_tensor_accepts_good() -> None:
    validate_tensor(torch.randn(2, 3, 4), shape=(2, 3, 4), dtype=torch.float32, name="x")
    validate_tensor(torch.zeros(2, 3, dtype=torch.int64), shape=(2, 3), dtype=torch.int64, name="ids")


@pytest.mark.parametrize("bad", [torch.randn(2, 3), torch.randn(2, 3, 5), torch.randn(4, 3, 2),
                                 torch.randn(6, 4), torch.randn(24), torch.randn(1, 2, 3, 4)])
def test_validate_tensor_shape(bad: torch.Tensor) -> None:
    assert _reason(validate_tensor, bad, shape=(2, 3, 4), dtype=torch.float32, name="x") == "shape"


def test_validate_tensor_same_numel_reshape_is_shape() -> None:
    t = torch.randn(2, 3, 4)
    assert _reason(validate_tensor, t.reshape(3, 2, 4), shape=(2, 3, 4), dtype=torch.float32,
                   name="x") == "shape"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_validate_tensor_dtype(dtype: torch.dtype) -> None:
    t = torch.zeros(2, 3, dtype=dtype)
    assert _reason(validate_tensor, t, shape=(2, 3), dtype=torch.float32, name="x") == "dtype"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_validate_tensor_nonfinite(value: float) -> None:
    t = torch.randn(2, 3)
    t[1, 2] = value
    assert _reason(validate_tensor, t, shape=(2, 3), dtype=torch.float32, name="x") == "nonfinite"


def test_validate_tensor_message_names_tensor() -> None:
    with pytest.raises(InvalidPayload, match="activations"):
        validate_tensor(torch.randn(3), shape=(4,), dtype=torch.float32, name="activations")


# -- require_fields -----------------------------------------------------------------------------------------


SPEC: dict[str, type | tuple[type, ...]] = {"run": str, "step": int, "lr": (int, float)}


def test_require_fields_ok() -> None:
    require_fields({"run": "r", "step": 0, "lr": 0.5, "extra": None}, SPEC)
    require_fields({"run": "r", "step": 7, "lr": 1}, SPEC)


@pytest.mark.parametrize("meta", [
    {"step": 0, "lr": 0.5},                     # missing run
    {"run": "r", "lr": 0.5},                    # missing step
    {"run": 5, "step": 0, "lr": 0.5},           # wrong type
    {"run": "r", "step": "0", "lr": 0.5},
    {"run": "r", "step": 1.0, "lr": 0.5},
    {"run": "r", "step": None, "lr": 0.5},
    {"run": "r", "step": True, "lr": 0.5},      # bool is not an int here
    {"run": "r", "step": False, "lr": 0.5},
    {"run": "r", "step": 0, "lr": "fast"},
])
def test_require_fields_rejects(meta: dict[str, Any]) -> None:
    assert _reason(require_fields, meta, SPEC) == "decode"


def test_stream_cut_short_is_decode_not_a_shorter_tensor() -> None:
    """A stream that ends early (hivemind treats a closed connection as end of stream) must not decode."""
    parts = list(iter_message_parts(runtime_pb2.ExpertRequest, {"k": 1}, [torch.arange(1000.0)], chunk_bytes=512))
    assert len(parts) > 2
    assert reason_of(parts[:-1]) == "decode"
    _, tensors = read(parts)
    assert torch.equal(tensors[0], torch.arange(1000.0))


# -- early checks: hooks, timeouts ----------------------------------------------------------------------------


class _Counting:
    """Yields `parts`, counting how many were consumed; with `stall_after`, never yields past that many."""

    def __init__(self, parts: Iterable[Any], stall_after: int | None = None) -> None:
        self.parts, self.consumed, self.stall_after = list(parts), 0, stall_after

    def __aiter__(self) -> _Counting:
        return self

    async def __anext__(self) -> Any:
        if self.stall_after is not None and self.consumed >= self.stall_after:
            await asyncio.Event().wait()
        if self.consumed >= len(self.parts):
            raise StopAsyncIteration
        self.consumed += 1
        return self.parts[self.consumed - 1]


def test_hooks_see_the_first_part_in_order_before_the_rest() -> None:
    small, big = torch.arange(4.0), torch.arange(600.0)  # 16 bytes: whole in part 1; 2400 bytes: 3 parts
    stream = _Counting(iter_message_parts(Request, {"k": 1}, [small, big], 1000))
    seen: list[Any] = []

    async def on_meta(meta: dict[str, Any]) -> None:
        seen.append(("meta", meta, stream.consumed))

    def on_header(index: int, part: runtime_pb2.Tensor) -> None:
        seen.append(("header", index, list(part.size), stream.consumed))

    async def on_first_part(meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
        seen.append(("first", [t.numel() for t in tensors], stream.consumed))

    async def go() -> tuple[dict[str, Any], list[torch.Tensor]]:
        return await read_message(stream, max_bytes=BIG_CAP, on_meta=on_meta, on_header=on_header,
                                  on_first_part=on_first_part)

    meta, tensors = asyncio.run(go())
    assert meta == {"k": 1}
    assert seen == [("meta", {"k": 1}, 1), ("header", 0, [4], 1), ("first", [4], 1), ("header", 1, [600], 2)]
    assert torch.equal(tensors[0], small) and torch.equal(tensors[1], big)


def test_a_hook_rejection_stops_the_stream_at_the_first_part() -> None:
    stream = _Counting(iter_message_parts(Request, {"k": 1}, [torch.zeros(1000)], 500))

    async def on_meta(meta: dict[str, Any]) -> None:
        raise InvalidPayload("unauthorized", "no")

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(stream, max_bytes=BIG_CAP, on_meta=on_meta))
    assert exc.value.reason == "unauthorized" and stream.consumed == 1


def test_on_meta_can_tighten_the_cap() -> None:
    parts = list(iter_message_parts(Request, {"k": 1}, [torch.zeros(100)], 64))  # 400 bytes

    async def go(limit: int) -> Any:
        async def on_meta(meta: dict[str, Any]) -> int:
            return limit

        return await read_message(_agen(parts), max_bytes=BIG_CAP, on_meta=on_meta)

    assert asyncio.run(go(400))[1][0].numel() == 100
    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(go(399))
    assert exc.value.reason == "too_large" and "399" in exc.value.detail


def test_a_hook_bug_is_not_disguised_as_decode() -> None:
    def on_header(index: int, part: runtime_pb2.Tensor) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        asyncio.run(read_message(_agen(iter_message_parts(Request, {}, [torch.zeros(3)], 64)),
                                 max_bytes=BIG_CAP, on_header=on_header))


def test_a_stall_is_timeout_at_the_part_timeout() -> None:
    stream = _Counting(iter_message_parts(Request, {}, [torch.zeros(100)], 64), stall_after=2)
    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(stream, max_bytes=BIG_CAP, part_timeout_s=0.05))
    assert exc.value.reason == "timeout" and "stalled" in exc.value.detail and stream.consumed == 2


def test_a_stream_past_its_deadline_is_timeout() -> None:
    async def trickle() -> AsyncIterator[Any]:
        for p in iter_message_parts(Request, {}, [torch.zeros(100)], 16):  # 25 parts
            await asyncio.sleep(0.02)
            yield p

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(trickle(), max_bytes=BIG_CAP, part_timeout_s=5, deadline_s=0.1))
    assert exc.value.reason == "timeout" and "deadline" in exc.value.detail


def test_more_parts_than_declared_is_decode() -> None:
    parts = list(iter_message_parts(Request, {}, [torch.zeros(8)], 16))  # 2 parts, chunks=2
    extra = Request(tensors=[runtime_pb2.Tensor(buffer=b"\0" * 4)])
    assert reason_of([*parts, extra]) == "decode"


def test_validate_header() -> None:
    part = serialize_torch_tensor(torch.zeros(2, 3))
    validate_header(part, shape=(2, 3), dtype="float32", name="x")
    assert _reason(validate_header, part, shape=(3, 2), dtype="float32", name="x") == "shape"
    assert _reason(validate_header, serialize_torch_tensor(torch.zeros(2, 3, dtype=torch.float64)), shape=(2, 3),
                   dtype="float32", name="x") == "dtype"
    odd = runtime_pb2.Tensor()
    odd.CopyFrom(part)
    odd.dtype = "float99"
    assert _reason(validate_header, odd, shape=(9,), dtype="float32", name="x") == "decode"


# -- decoding off the event loop ------------------------------------------------------------------------------


def test_check_sees_every_tensor_and_large_ones_are_decoded_off_the_loop() -> None:
    small, big = torch.arange(4.0), torch.randn(OFFLOAD_BYTES // 4)  # 16 bytes; exactly the offload size
    parts = list(iter_message_parts(Request, {"k": 1}, [small, big], 2**20))
    seen: list[tuple[int, bool]] = []

    def check(t: torch.Tensor) -> torch.Tensor:
        seen.append((t.numel(), threading.current_thread() is threading.main_thread()))
        return t * 2

    _, tensors = asyncio.run(read_message(_agen(parts), max_bytes=BIG_CAP, check=check))
    assert seen == [(4, True), (big.numel(), False)]  # the small one on the loop's thread, the big one not
    assert torch.equal(tensors[0], small * 2) and torch.equal(tensors[1], big * 2)  # what check returned


def test_a_check_rejection_off_the_loop_is_the_streams_rejection() -> None:
    bad = torch.zeros(OFFLOAD_BYTES // 4)  # exactly the offload size
    bad[7] = float("nan")

    def check(t: torch.Tensor) -> torch.Tensor:
        validate_tensor(t, shape=tuple(bad.shape), dtype=torch.float32, name="forward")
        return t

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(_agen(iter_message_parts(Request, {}, [bad], 2**20)), max_bytes=BIG_CAP,
                                 check=check))
    assert exc.value.reason == "nonfinite"


def test_a_truncated_large_tensor_is_decode_before_any_decoding() -> None:
    parts = list(iter_message_parts(Request, {}, [torch.zeros(OFFLOAD_BYTES // 4)], OFFLOAD_BYTES // 4))  # 4 parts
    calls: list[int] = []

    def check(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.numel())
        return t

    with pytest.raises(InvalidPayload) as exc:
        asyncio.run(read_message(_agen(parts[:2]), max_bytes=BIG_CAP, check=check))
    assert exc.value.reason == "decode" and "truncated" in str(exc.value) and calls == []
