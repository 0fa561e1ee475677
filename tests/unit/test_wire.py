"""`--wire-dtype` (cfnode/net/wire.py): hops travel in the run's wire dtype, arrive as float32, cost the bytes
stated, and a hop in another encoding is refused before its bytes are read."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
import torch
from hivemind.proto import runtime_pb2

from cfnode.config import WIRE_DTYPES, NetworkConfig
from cfnode.errors import ConfigError
from cfnode.net import wire
from cfnode.net.codec import iter_message_parts, read_message
from cfnode.net.records import MetaRecord
from cfnode.node.claim import meta_mismatch
from tests.unit.test_service import (
    CHUNK,
    CONFIG,
    SHAPE,
    FakeHost,
    Parts,
    forward,
    hop_meta,
    rejected,
    run,
    servicer,
)

Request = runtime_pb2.ExpertRequest
NUMEL = 1
for _n in SHAPE:
    NUMEL *= _n
WIRE_BYTES = {"float32": 4 * NUMEL, "float16": 2 * NUMEL, "bfloat16": 2 * NUMEL, "uint8": NUMEL + 8 + 4 * 256}
"""Tensor bytes of one hop (8192 values) per wire dtype."""
MAX_ERROR = {"float32": 0.0, "float16": 2**-10, "bfloat16": 2**-7, "uint8": 0.5}
"""Largest error relative to max |x| of a standard-normal hop: float16 and bfloat16 round to their mantissas;
uint8 is hivemind's 256 buckets over 6 sigma (each value becomes its bucket's mean, the tails clamp)."""


def _hop(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_each_wire_dtype_round_trips_within_its_precision_and_costs_its_bytes(wire_dtype: str) -> None:
    x = _hop()
    parts = list(iter_message_parts(Request, {"k": 1}, [x], CHUNK, wire_dtype))
    sent = sum(len(t.buffer) for p in parts for t in p.tensors)
    stats: dict[str, int] = {}

    async def read() -> torch.Tensor:
        async def stream():
            for p in parts:
                yield p
        _, tensors = await read_message(stream(), max_bytes=10 * NUMEL, stats=stats)
        return tensors[0]

    y = wire.to_float32(run(read()), wire_dtype)
    assert sent == stats["bytes"] == WIRE_BYTES[wire_dtype]
    assert y.dtype == torch.float32 and y.shape == x.shape
    error = float((y - x).abs().max() / x.abs().max())
    assert error <= MAX_ERROR[wire_dtype], error
    if wire_dtype == "float32":
        assert torch.equal(x, y)


class WireHost(FakeHost):
    def __init__(self, wire_dtype: str) -> None:
        super().__init__()
        self.config = dataclasses.replace(CONFIG, network=NetworkConfig(wire_dtype=wire_dtype))
        self.tensors: list[torch.Tensor] = []

    async def accept_hop(self, method: str, meta: dict[str, Any], tensor: torch.Tensor) -> None:
        await super().accept_hop(method, meta, tensor)
        self.tensors.append(tensor)


@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_a_stage_takes_hops_in_the_runs_wire_dtype_only(wire_dtype: str) -> None:
    svc, host = servicer(WireHost(wire_dtype))
    x = _hop(1)
    ok = Parts(iter_message_parts(Request, hop_meta(), [x], CHUNK, wire_dtype))
    assert run(forward(svc, ok)) == {"ok": True}
    assert host.tensors[0].dtype == torch.float32
    received = svc.host.metrics.registry.get_sample_value(
        "cfnode_transfer_bytes_total", {"direction": "received", "kind": "activations"})
    assert received == WIRE_BYTES[wire_dtype]
    for other in WIRE_DTYPES:
        if wire.header(other) == wire.header(wire_dtype):
            continue
        parts = Parts(iter_message_parts(Request, hop_meta(), [x], CHUNK, other))
        reply = run(forward(svc, parts))
        assert reply["reason"] == "dtype", (other, reply)
        assert parts.consumed == 1  # refused on its header
    assert rejected(svc, "dtype") == len({wire.header(o) for o in WIRE_DTYPES}) - 1


def test_a_malformed_8bit_tensor_is_a_decode_error() -> None:
    good = wire.encode(_hop(2), "uint8")
    bad_size = runtime_pb2.Tensor()
    bad_size.CopyFrom(good)
    bad_size.buffer = struct.pack("<q", 10**6) + good.buffer[8:]
    truncated = runtime_pb2.Tensor()
    truncated.CopyFrom(good)
    truncated.buffer = good.buffer[:-1]
    small = runtime_pb2.Tensor()
    small.CopyFrom(good)
    small.buffer = struct.pack("<q", 2) + good.buffer[8:16] + good.buffer[8 + 4 * 256:]  # indices past 2 entries
    for tensor in (bad_size, truncated, small):
        with pytest.raises(ValueError):
            wire.decode(tensor)
    svc, _ = servicer(WireHost("uint8"))
    parts = Parts([Request(metadata=next(iter_message_parts(Request, hop_meta(), [], CHUNK)).metadata,
                           tensors=[bad_size])])
    assert run(forward(svc, parts))["reason"] == "decode"


def test_the_wire_dtype_is_run_wide() -> None:
    record = MetaRecord(num_stages=2, model_config_hash="h", wire_dtype="float16")
    assert MetaRecord.from_wire(record.to_wire()) == record
    assert "wire_dtype" not in MetaRecord(num_stages=2, model_config_hash="h").to_wire()  # float32: as before
    assert MetaRecord.from_wire({**record.to_wire(), "wire_dtype": "int4"}) is None
    problem = meta_mismatch("r", record, dataclasses.replace(record, wire_dtype="float32"), preset="tiny")
    assert problem is not None and "--wire-dtype float16" in problem
    with pytest.raises(ConfigError, match="wire_dtype"):
        NetworkConfig(wire_dtype="int4")
