"""Protocol version 2: owner-bound, signed DHT records (net/identity.py, net/validation.py).

Records are built and signed exactly as hivemind's DHTNode.store does (msgpack subkey and value, the composite
validator's sign_value) and validated the way DHTProtocol does on a store or a read."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import pickle
import stat
from types import SimpleNamespace
from typing import Any

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

from cfnode.config import PROTOCOL_VERSION
from cfnode.errors import ConfigError
from cfnode.net.identity import (
    NodeIdentity,
    is_owner_marker,
    load_private_key,
    open_identity,
    owner_marker,
    peer_id_of_marker,
)
from cfnode.net.records import MetaRecord, StageRecord, StageState, meta_key, stage_key, standby_key
from cfnode.net.validation import (
    REJECT_REASONS,
    RunRecordValidator,
    rejected_counts,
    stage_horizon_s,
)

RUN, L, TTL = "r", 3, 2.0


@pytest.fixture(scope="module")
def alice() -> NodeIdentity:
    identity = open_identity(None)
    yield identity
    identity.discard()


@pytest.fixture(scope="module")
def mallory() -> NodeIdentity:
    identity = open_identity(None)
    yield identity
    identity.discard()


@pytest.fixture
def run_validator() -> RunRecordValidator:
    return RunRecordValidator(RUN, L, ttl_s=TTL)


def record(key: str, subkey: Any, value: Any, expiration: float) -> DHTRecord:
    """A record as DHTNode.store builds it before signing: hashed key, msgpack subkey and value."""
    subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
    return DHTRecord(DHTID.generate(source=key).to_bytes(), subkey_bytes, MSGPackSerializer.dumps(value), expiration)


def signed(rec: DHTRecord, *validators: Any) -> DHTRecord:
    return dataclasses.replace(rec, value=CompositeValidator(validators).sign_value(rec))


def online(generation: int = 1, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return StageRecord(state=StageState.ONLINE, step=3, generation=generation, version=version).to_wire()


def soon() -> float:
    return get_dht_time() + TTL


def check(validator: RunRecordValidator, signer: NodeIdentity, rec: DHTRecord) -> bool:
    """What a node of the run decides: its composite (RSASignatureValidator + the run validator)."""
    return CompositeValidator([signer.signature_validator(), validator]).validate(rec)


def rejected_for(validator: RunRecordValidator) -> dict[str, int]:
    return {k: v for k, v in validator.rejected.items() if v}


# -- accepted -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    (stage_key(RUN, 0), online()),
    (stage_key(RUN, L), StageRecord(state=StageState.OFFLINE).to_wire()),
    (standby_key(RUN), StageRecord(state=StageState.STANDBY).to_wire()),
    (meta_key(RUN), MetaRecord(num_stages=L, model_config_hash="h").to_wire()),
])
def test_a_properly_signed_record_is_accepted(alice: NodeIdentity, run_validator: RunRecordValidator,
                                              key: str, value: dict[str, Any]) -> None:
    rsa = alice.signature_validator()
    rec = signed(record(key, alice.marker, value, soon()), rsa, run_validator)
    assert check(run_validator, alice, rec)
    assert run_validator.validate(rec)  # alone, too: it checks the signature itself
    assert rejected_for(run_validator) == {}
    # what a reader gets back once hivemind strips the signature: the record as written
    stripped = CompositeValidator([rsa, run_validator]).strip_value(rec)
    assert MSGPackSerializer.loads(stripped) == value


def test_a_record_signed_by_another_member_is_accepted_by_everyone(alice: NodeIdentity, mallory: NodeIdentity,
                                                                   run_validator: RunRecordValidator) -> None:
    rec = signed(record(stage_key(RUN, 1), alice.marker, online(), soon()), alice.signature_validator())
    assert check(run_validator, mallory, rec)  # the reader's own key plays no part in validating


def test_keys_of_other_runs_pass_untouched(run_validator: RunRecordValidator) -> None:
    for key in (stage_key("other", 1), "some:key", stage_key(RUN, L + 1)):
        assert run_validator.validate(record(key, "plain", {"anything": 1}, get_dht_time() + 1e6))
    assert rejected_for(run_validator) == {}


def test_our_validator_runs_first_on_the_signed_value(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    """CompositeValidator validates by decreasing priority and strips each validator's signature before the
    next one: ours must come before RSASignatureValidator (10) to see (and check) the signature."""
    assert run_validator.priority > alice.signature_validator().priority
    composite = CompositeValidator([alice.signature_validator(), run_validator])
    assert [type(v) for v in reversed(composite._validators)] == [RunRecordValidator, RSASignatureValidator]


# -- rejected -----------------------------------------------------------------------------------------------


def test_an_unsigned_record_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    rec = record(stage_key(RUN, 2), alice.marker, online(), soon())
    assert not check(run_validator, alice, rec)
    assert rejected_for(run_validator) == {"unsigned": 1}


@pytest.mark.parametrize("subkey", [
    PeerID.from_base58("QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco").to_base58(),  # v1: the plain peer id
    b"QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",
    None,  # a plain value (v1 meta) where a dictionary of owners belongs
])
def test_a_record_under_a_plain_subkey_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator,
                                                   subkey: Any) -> None:
    for key, value in ((stage_key(RUN, 2), online(generation=2**40)),
                       (meta_key(RUN), MetaRecord(num_stages=L, model_config_hash="evil").to_wire())):
        rec = signed(record(key, subkey, value, soon()), alice.signature_validator())
        assert not check(run_validator, alice, rec)
    assert rejected_for(run_validator) == {"not_owner": 2}


def test_a_marker_inside_a_longer_subkey_is_not_an_owner(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    """RSASignatureValidator finds a marker anywhere in a subkey; we require the subkey to be exactly one."""
    for subkey in (b"x" + alice.marker, alice.marker + b"y", alice.marker + alice.marker):
        rec = signed(record(stage_key(RUN, 1), subkey, online(), soon()), alice.signature_validator())
        assert not run_validator.validate(rec)
    assert rejected_for(run_validator) == {"not_owner": 3}


def test_a_forged_signature_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    rec = record(stage_key(RUN, 2), alice.marker, online(), soon())
    forged = dataclasses.replace(rec, value=rec.value + b"[signature:" + b"A" * 344 + b"]")
    assert not check(run_validator, alice, forged)
    good = signed(rec, alice.signature_validator())
    tampered = dataclasses.replace(good, value=good.value.replace(MSGPackSerializer.dumps(3), MSGPackSerializer.dumps(9), 1))
    assert tampered.value != good.value
    assert not check(run_validator, alice, tampered)
    later = dataclasses.replace(good, expiration_time=good.expiration_time + 1)  # the expiration is signed too
    assert not check(run_validator, alice, later)
    assert rejected_for(run_validator) == {"bad_signature": 3}


def test_a_record_under_someone_elses_marker_is_rejected(alice: NodeIdentity, mallory: NodeIdentity,
                                                         run_validator: RunRecordValidator) -> None:
    """Mallory writes OFFLINE (far in the future) under Alice's marker: hivemind's signer will not sign it
    (the marker is not Mallory's), and a signature by Mallory's key does not verify against Alice's."""
    rec = record(stage_key(RUN, 2), alice.marker, StageRecord(state=StageState.OFFLINE).to_wire(), soon())
    by_hivemind = signed(rec, mallory.signature_validator())
    assert by_hivemind.value == rec.value  # RSASignatureValidator.sign_value: not our marker, not signed
    by_hand = dataclasses.replace(rec, value=rec.value + RSASignatureValidator.SIGNATURE_FORMAT.replace(
        b"_value_", mallory.private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(rec)))))
    for forged in (by_hivemind, by_hand):
        assert not check(run_validator, mallory, forged)
        assert not check(run_validator, alice, forged)
    assert rejected_for(run_validator) == {"unsigned": 2, "bad_signature": 2}


def test_an_out_of_bounds_expiration_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    rsa = alice.signature_validator()
    now = get_dht_time()
    horizon = stage_horizon_s(TTL)
    assert horizon == 4 * TTL + 3  # a few ttl, plus the clock skew hivemind tolerates
    ok = [record(stage_key(RUN, 1), alice.marker, online(), now + horizon - 1),
          record(standby_key(RUN), alice.marker, StageRecord(state=StageState.STANDBY).to_wire(), now + TTL + 1),
          record(meta_key(RUN), alice.marker, MetaRecord(num_stages=L, model_config_hash="h").to_wire(), now + 3600)]
    bad = [record(stage_key(RUN, 1), alice.marker, StageRecord(state=StageState.OFFLINE).to_wire(), now + 3600),
           record(standby_key(RUN), alice.marker, StageRecord(state=StageState.STANDBY).to_wire(), now + horizon + 1),
           record(stage_key(RUN, 1), alice.marker, online(), math.inf),
           record(stage_key(RUN, 1), alice.marker, online(), math.nan),
           record(meta_key(RUN), alice.marker, MetaRecord(num_stages=L, model_config_hash="h").to_wire(), now + 7200)]
    assert all(check(run_validator, alice, signed(r, rsa)) for r in ok)
    assert not any(check(run_validator, alice, signed(r, rsa)) for r in bad)
    assert rejected_for(run_validator) == {"expiration": len(bad)}


@pytest.mark.parametrize("key, value", [
    (stage_key(RUN, 1), {"state": "PWNED", "generation": 2**40}),
    (stage_key(RUN, 1), "not a map"),
    (stage_key(RUN, 1), {"state": "ONLINE", "grad_norm": math.inf, "version": PROTOCOL_VERSION}),
    (standby_key(RUN), [1, 2, 3]),
    (meta_key(RUN), {"num_stages": L}),  # no model_config_hash
    (meta_key(RUN), {"num_stages": L, "model_config_hash": "h", "clip_norm": math.nan, "version": 2}),
])
def test_an_unparseable_value_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator, key: str,
                                          value: Any) -> None:
    rec = signed(record(key, alice.marker, value, soon()), alice.signature_validator())
    assert not check(run_validator, alice, rec)
    assert rejected_for(run_validator) == {"unparseable": 1}


def test_a_signed_value_that_is_not_msgpack_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    rec = record(stage_key(RUN, 1), alice.marker, None, soon())
    rec = signed(dataclasses.replace(rec, value=b"\xc1\xc1garbage"), alice.signature_validator())
    assert not run_validator.validate(rec)
    assert rejected_for(run_validator) == {"unparseable": 1}


def test_a_version_1_record_is_rejected(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    assert PROTOCOL_VERSION == 2
    rsa = alice.signature_validator()
    old_meta = {**MetaRecord(num_stages=L, model_config_hash="h").to_wire(), "version": 1}
    for rec in (record(stage_key(RUN, 0), alice.marker, online(version=1), soon()),
                record(meta_key(RUN), alice.marker, old_meta, soon())):
        assert not check(run_validator, alice, signed(rec, rsa))
    assert rejected_for(run_validator) == {"version": 2}


def test_a_marker_with_a_broken_key_never_raises(alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    """hivemind calls validate() inside its RPC handlers: a hostile record must yield False, not an exception
    (RSASignatureValidator alone would raise on this one)."""
    broken = b"[owner:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ]"
    assert is_owner_marker(broken) and peer_id_of_marker(broken) is None
    rec = record(stage_key(RUN, 1), broken, online(), soon())
    rec = dataclasses.replace(rec, value=rec.value + b"[signature:AAAA]")
    assert not check(run_validator, alice, rec)
    assert sum(run_validator.rejected.values()) == 1


def test_rejections_are_counted_by_reason_and_read_through_the_dht_coroutine(
        alice: NodeIdentity, run_validator: RunRecordValidator) -> None:
    run_validator.validate(record(stage_key(RUN, 1), "plain", online(), soon()))
    run_validator.validate(record(stage_key(RUN, 1), alice.marker, online(), soon()))
    other = RunRecordValidator("other", 1, ttl_s=TTL)
    other.rejected["expiration"] = 5
    composite = CompositeValidator([alice.signature_validator(), run_validator, other])
    node = SimpleNamespace(protocol=SimpleNamespace(record_validator=composite))
    counts = asyncio.run(rejected_counts(None, node))
    assert set(counts) == set(REJECT_REASONS)
    assert counts == {**dict.fromkeys(REJECT_REASONS, 0), "not_owner": 1, "unsigned": 1, "expiration": 5}


def test_the_validator_pickles(run_validator: RunRecordValidator, alice: NodeIdentity) -> None:
    copy = pickle.loads(pickle.dumps(run_validator))
    rec = signed(record(stage_key(RUN, 1), alice.marker, online(), soon()), alice.signature_validator())
    assert copy.validate(rec) and not copy.validate(record(stage_key(RUN, 1), "plain", online(), soon()))


# -- identity and peer ids ----------------------------------------------------------------------------------


def test_the_peer_id_derives_from_the_marker_as_libp2p_does(alice: NodeIdentity, mallory: NodeIdentity) -> None:
    for identity in (alice, mallory):
        with open(identity.path, "rb") as f:
            expected = PeerID.from_identity(f.read()).to_base58()
        assert identity.marker == identity.signature_validator().local_public_key == owner_marker(identity.private_key)
        assert peer_id_of_marker(identity.marker) == identity.peer_id == expected
    assert alice.peer_id != mallory.peer_id


@pytest.mark.parametrize("subkey", ["QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco", b"", b"[owner:]",
                                    b"[owner:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA]", None, 42])
def test_a_non_marker_derives_no_peer_id(subkey: Any) -> None:
    assert peer_id_of_marker(subkey) is None


def test_an_identity_file_is_created_once_and_loaded(tmp_path) -> None:
    path = str(tmp_path / "sub" / "node.id")
    first = open_identity(path)
    assert os.path.exists(path) and not first.temporary
    again = open_identity(path)
    assert again.peer_id == first.peer_id and again.marker == first.marker
    again.discard()  # a persistent identity is never deleted
    assert os.path.exists(path)


def test_a_temporary_identity_is_private_and_removed(tmp_path) -> None:
    identity = open_identity(None)
    try:
        assert identity.temporary
        directory = os.path.dirname(identity.path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(identity.path).st_mode) == 0o400
    finally:
        identity.discard()
    assert not os.path.exists(directory)
    identity.discard()  # idempotent


def test_a_non_rsa_identity_is_refused(tmp_path) -> None:
    path = tmp_path / "ed.id"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=b"\0" * 64).SerializeToString())
    with pytest.raises(ConfigError, match="Ed25519 key"):
        load_private_key(str(path))
    (tmp_path / "junk.id").write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(ConfigError):
        load_private_key(str(tmp_path / "junk.id"))


def test_hivemind_and_cfnode_identities_are_the_same_format(tmp_path) -> None:
    path = str(tmp_path / "hm.id")
    P2P.generate_identity(path)
    assert peer_id_of_marker(owner_marker(load_private_key(path))) == PeerID.from_identity(
        open(path, "rb").read()).to_base58()


@pytest.mark.loopback
def test_a_dht_runs_as_its_signing_key_and_binds_its_records(mallory: NodeIdentity) -> None:
    """A real DHT: p2pd uses our identity (dht.peer_id is the marker's peer id), our stores are signed and
    accepted by the run validator, a reader maps them back to the peer id, and a forged one is counted."""
    from cfnode.config import NetworkConfig
    from cfnode.net.dht import SwarmDHT, create_dht

    identity = open_identity(None)
    validators = [identity.signature_validator(), RunRecordValidator(RUN, L, ttl_s=TTL)]
    dht = create_dht(NetworkConfig(), validators=validators, identity=identity)
    try:
        assert not os.path.exists(identity.path)  # a temporary identity is gone once p2pd has read it
        assert dht.peer_id.to_base58() == identity.peer_id == peer_id_of_marker(identity.marker)
        swarm = SwarmDHT(dht, run_id=RUN, num_stages=L, ttl_s=TTL, owner=identity.marker)

        async def scenario() -> tuple[Any, ...]:
            assert await swarm.store_stage(1, StageRecord(state=StageState.ONLINE, generation=1))
            assert await swarm.store_meta(MetaRecord(num_stages=L, model_config_hash="h"))
            forged = dht.store(stage_key(RUN, 1), online(2**40), get_dht_time() + TTL, subkey="QmForger",
                               return_future=True)
            return await swarm.read_view(), await swarm.read_meta(), await forged, await swarm.rejected_records()

        view, metas, forged_ok, rejected = asyncio.run(scenario())
        assert [(p.peer_id, p.record.generation) for p in view.members(1)] == [(identity.peer_id, 1)]
        assert list(metas) == [identity.peer_id] and metas[identity.peer_id].model_config_hash == "h"
        assert forged_ok is False and rejected["not_owner"] >= 1
        with pytest.raises(ValueError, match="owner marker"):
            SwarmDHT(dht, run_id=RUN, num_stages=L, ttl_s=TTL, owner=mallory.marker)
    finally:
        dht.shutdown()

