"""The DHT record validator of one run (protocol version 2, docs/protocol.md "Signed records").

hivemind calls a DHT's validators, inside the DHT process, on every record another peer asks it to store
(`DHTProtocol.rpc_store`), on every record a peer returns to its reads (`call_find`) and on its own stores
before they land locally. `RunRecordValidator` guards this run's keys, `{run}:stage:0..L`, `{run}:standby` and
`{run}:meta`, recognised by their hashed key bytes (the way hivemind's SchemaValidator does it), and accepts a
record only if

* its subkey is exactly one owner marker `[owner:ssh-rsa ...]` (reason `not_owner` otherwise: a plain peer-id
  subkey, as protocol version 1 wrote, or no subkey);
* its value carries exactly one signature (`unsigned`) that verifies against that marker's key
  (`bad_signature`: forged, or signed by somebody else's key);
* the value, signature stripped, parses as the key's record, `StageRecord` or `MetaRecord` (`unparseable`), of
  protocol version 2 or later (`version`);
* its expiration is at most `stage_horizon_s` (a few ttl) from now for stage and standby records and
  `meta_horizon_s` (the meta ttl and some slack) for the meta (`expiration`).

Keys of other runs and other applications pass untouched (hivemind's RSASignatureValidator still guards their
marked subkeys). Ordering: hivemind's CompositeValidator validates in decreasing `priority` and strips each
validator's signature before the next one; this validator has a priority above RSASignatureValidator's (10), so
it sees the still-signed value, checks the signature itself (so that forged and stolen subkeys are counted by
reason here) and strips it before parsing; RSASignatureValidator then checks the same signature again.

A rejection drops the whole dictionary value a peer returned for that key (hivemind validates a dictionary as a
unit), so a reader never sees a forged subkey, only the copies of honest holders. Counts per reason live in the
DHT process; `rejected_counts` (a `run_coroutine` target defined at import, before any DHT forks) reads them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPublicKey
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS

from cfnode.config import PROTOCOL_VERSION
from cfnode.net.identity import marker_public_key
from cfnode.net.records import MetaRecord, StageRecord, meta_key, stage_key, standby_key

logger = logging.getLogger(__name__)

REJECT_REASONS = ("not_owner", "unsigned", "bad_signature", "unparseable", "version", "expiration")
"""Why a record of this run was rejected (`cfnode_dht_records_rejected_total{reason}`)."""
META_TTL_S = 3600.0
"""Expiration of a node's `{run}:meta` copy (refreshed every META_REFRESH_S while the node lives)."""
STAGE_HORIZON_TTLS = 4
"""A stage or standby record may expire at most this many ttl (plus the tolerated clock skew) from now."""
META_SLACK_S = 60.0
_SIGNATURE_RE = re.compile(re.escape(RSASignatureValidator.SIGNATURE_FORMAT).replace(b"_value_", rb"(.+?)"))
_STAGE, _META = "stage", "meta"


def stage_horizon_s(ttl_s: float) -> float:
    return STAGE_HORIZON_TTLS * ttl_s + MAX_DHT_TIME_DISCREPANCY_SECONDS


def _hashed(key: str) -> bytes:
    return DHTID.generate(source=key).to_bytes()


class RunRecordValidator(RecordValidatorBase):
    """Schema, owner and bounds of one run's records. Module-level and picklable (plain attributes only), so it
    can also be handed to a running DHT with `DHT.add_validators`."""

    def __init__(self, run_id: str, num_stages: int, *, ttl_s: float, meta_ttl_s: float = META_TTL_S) -> None:
        self.run_id = run_id
        self.stage_horizon_s = stage_horizon_s(ttl_s)
        self.meta_horizon_s = meta_ttl_s + META_SLACK_S
        kinds = {_hashed(stage_key(run_id, i)): _STAGE for i in range(num_stages + 1)}
        kinds[_hashed(standby_key(run_id))] = _STAGE
        kinds[_hashed(meta_key(run_id))] = _META
        self._kinds = kinds
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator (10): validated first, on the still-signed value

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True  # not this run's key
        try:
            reason = self._check(record, kind)
        except Exception:  # a hostile record must never raise inside hivemind's handlers
            logger.debug("record validation raised", exc_info=True)
            reason = "unparseable"
        if reason is None:
            return True
        self.rejected[reason] += 1
        if self.rejected[reason] == 1:  # once per reason and process; every one is counted
            logger.warning("rejected a DHT record of run %r (%s); further ones are only counted",
                           self.run_id, reason)
        return False

    def _check(self, record: DHTRecord, kind: str) -> str | None:
        if record.subkey in (b"", None):
            return "not_owner"
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
        except Exception:  # noqa: BLE001 - reserved subkey tags and garbage alike
            return "not_owner"
        ssh_key = marker_public_key(subkey)
        if ssh_key is None:
            return "not_owner"
        signatures = _SIGNATURE_RE.findall(record.value)
        if len(signatures) != 1:
            return "unsigned"
        stripped = dataclasses.replace(record, value=_SIGNATURE_RE.sub(b"", record.value))
        try:
            public_key = RSAPublicKey.from_bytes(ssh_key)
        except (ValueError, TypeError):
            return "not_owner"
        if not public_key.verify(MSGPackSerializer.dumps(dataclasses.astuple(stripped)), signatures[0]):
            return "bad_signature"
        value = MSGPackSerializer.loads(stripped.value)
        parsed = (StageRecord if kind == _STAGE else MetaRecord).from_wire(value)
        if parsed is None:
            return "unparseable"
        if parsed.version < PROTOCOL_VERSION:
            return "version"
        horizon = self.stage_horizon_s if kind == _STAGE else self.meta_horizon_s
        if not record.expiration_time <= get_dht_time() + horizon:  # `not <=`: NaN is out of bounds too
            return "expiration"
        return None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False  # one per run; two runs' validators each guard their own keys


async def rejected_counts(dht: Any, node: Any) -> dict[str, int]:
    """Runs inside the DHT process: records rejected by reason, summed over this DHT's run validators."""
    out = dict.fromkeys(REJECT_REASONS, 0)
    composite = node.protocol.record_validator
    for validator in getattr(composite, "_validators", [composite]):
        if isinstance(validator, RunRecordValidator):
            for reason, count in validator.rejected.items():
                out[reason] = out.get(reason, 0) + count
    return out


__all__ = ["META_TTL_S", "REJECT_REASONS", "RunRecordValidator", "rejected_counts", "stage_horizon_s"]
