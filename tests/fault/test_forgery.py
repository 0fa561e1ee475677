"""Forged DHT records do not move a training swarm (protocol version 2: owner-bound, signed records).

Once the swarm trains, an outsider, a stock `hivemind.DHT` peer with no cfnode code that joined through the
bootstrap, keeps writing, for the whole attack window:
  (a) an ONLINE record at generation 2**40 for stage 2, once under its own base58 peer id as subkey (the
      protocol-1 attack) and once signed by its own RSASignatureValidator under its own owner marker;
  (b) an OFFLINE record expiring in an hour under the victim's (stage 2's owner's) marker, unsigned, and once
      more with a forged signature written straight into the victim's subkey with a raw store RPC;
  (c) the run's meta with another model, as a plain value and signed under its own marker.
Before protocol 2 (a) fenced the owner and routed the ring to the attacker, (b) evicted the owner and (c)
locked every joiner out. Now training goes on with contiguous steps, nobody fences, stage 2 keeps its owner,
a joiner with the right config gets in (as a spare), and the nodes count the forgeries they rejected.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterable
from functools import partial

import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.support.swarm import Harness, metric, run_cli, scrape, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]

HUGE = 2**40


@pytest.fixture
def harness(make_harness) -> Harness:
    return make_harness("forge", stages=3)


async def _store_raw(dht: DHT, node, *, key: str, subkey: bytes, value: bytes, expiration: float) -> list:
    """Runs inside the attacker's DHT process: ask every peer it knows to store these exact bytes (hivemind's
    own store path would not put a forged signature into somebody else's subkey)."""
    key_id = DHTID.generate(source=key)
    peers = list(node.protocol.routing_table.peer_id_to_uid)
    results = await asyncio.gather(*(node.protocol.call_store(p, [key_id], [value], expiration, subkeys=[subkey])
                                     for p in peers), return_exceptions=True)
    return [list(r) if isinstance(r, Iterable) else repr(r) for r in results]  # plain data through the pipe


def _record(state: str, *, generation: int, step: int = 10**6) -> dict:
    return {"state": state, "step": step, "generation": generation, "grad_norm": 1.0, "grad_norm_raw": 1.0,
            "throughput": 0.0, "donor": True, "replica_step": -1, "version": 2}


class Attacker:
    """A stock hivemind DHT peer that rewrites the forgeries every `period_s` until stopped."""

    def __init__(self, h: Harness, victim_peer_id: str) -> None:
        self.h = h
        self.validator = RSASignatureValidator(RSAPrivateKey())
        self.dht = DHT(initial_peers=[h.bootstrap_maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                       record_validators=[self.validator])
        self.peer_id = self.dht.peer_id.to_base58()
        self.victim_marker = self._marker_of(victim_peer_id)
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []
        self.results: dict[str, list] = {}
        self.thread = threading.Thread(target=self._loop, name="attacker", daemon=True)

    def _marker_of(self, peer_id: str) -> bytes:
        """The victim's subkey, as anyone reading `{run}:stage:2` sees it."""
        from cfnode.net.identity import peer_id_of_marker  # only to recognise it among the subkeys

        found = wait_until(lambda: self.dht.get(f"{self.h.run_id}:stage:2", latest=True), 30, "stage 2's record")
        return next(s for s in found.value if peer_id_of_marker(s) == peer_id)

    def _attack_once(self) -> None:
        run, now, ttl = self.h.run_id, get_dht_time(), self.h.ttl_s
        stage2, meta = f"{run}:stage:2", f"{run}:meta"
        evil_meta = {"num_stages": 3, "model_config_hash": "0123456789abcdef", "recovery_mode": "checkfree",
                     "version": 2}
        stores = {
            "a_plain_subkey": (stage2, _record("ONLINE", generation=HUGE), now + 3600, self.peer_id),
            "a_signed_own_marker": (stage2, _record("ONLINE", generation=HUGE), now + ttl,
                                    self.validator.local_public_key),
            "b_victim_marker": (stage2, _record("OFFLINE", generation=1), now + 3600, self.victim_marker),
            "c_meta_plain": (meta, evil_meta, now + 3600, None),
            "c_meta_signed": (meta, evil_meta, now + 3000, self.validator.local_public_key),
        }
        for name, (key, value, expiration, subkey) in stores.items():
            self.results.setdefault(name, []).append(self.dht.store(key, value, expiration, subkey=subkey))
        signature = RSASignatureValidator.SIGNATURE_FORMAT.replace(b"_value_", base64.b64encode(b"\x01" * 256))
        forged = MSGPackSerializer.dumps(_record("OFFLINE", generation=1)) + signature
        raw = partial(_store_raw, key=stage2, subkey=self.victim_marker, value=forged, expiration=now + 3600)
        self.results.setdefault("b_forged_signature", []).append(self.dht.run_coroutine(raw))

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self._attack_once()
                self.rounds += 1
            except Exception as e:  # keep attacking; the test reports the errors
                self.errors.append(repr(e))
            self.stop.wait(0.5)

    def __enter__(self) -> Attacker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.dht.shutdown()


@pytest.mark.slow  # ~100 s: attack, 15 steps under it, a late joiner, recovery; the validator has unit tests
def test_forged_records_change_nothing(harness: Harness) -> None:
    h = harness
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(h.stages + 1)]
    infos = {n.name: h.ready_info(n) for n in nodes}
    head, victim = nodes[0], nodes[2]
    victim_id = infos["node2"]["peer_id"]
    steps = lambda: h.events(head, "step")  # noqa: E731
    wait_until(lambda: len(steps()) >= 5, 180, "5 steps before the attack")

    with Attacker(h, victim_id) as attacker:
        wait_until(lambda: attacker.rounds >= 3 or attacker.errors, 60, "three rounds of forgeries")
        assert not attacker.errors, attacker.errors
        started = len(steps())
        wait_until(lambda: len(steps()) >= started + 10, 180, "10 more steps under attack")
        late = h.start_node("late")  # the right config: must not be locked out by the forged meta
        wait_until(lambda: h.events(late, "standby"), 120, "the late joiner to wait as a spare")
        status = run_cli("status", "--peers", h.bootstrap_maddr, "--run-id", h.run_id, "--json",
                         "--heartbeat-ttl", str(h.ttl_s))
        wait_until(lambda: len(steps()) >= started + 15, 180, "training to go on while the joiner waits")
        rejected = [scrape(i["metrics_port"]) for i in infos.values()]

    # the attacker's writes reached the DHT (a plain-subkey store lands only at peers without the run's
    # validator, the bootstrap and the attacker itself, when they are among the key's nearest; its own signed
    # ones are valid records), yet none of them took effect
    assert attacker.rounds >= 3
    assert any(attacker.results["a_signed_own_marker"]), attacker.results  # a valid record of an outsider
    assert not any(attacker.results["b_victim_marker"]), attacker.results  # every holder refused it
    committed = [e["step"] for e in steps()]
    assert committed == list(range(1, len(committed) + 1))
    for n in [*nodes, late]:
        assert h.events(n, "fenced") == [], (n.name, h.events(n, "fenced"))
        assert n.alive(), n.name
    victim_metrics = scrape(infos["node2"]["metrics_port"])
    assert metric(victim_metrics, "cfnode_stage_index") == 2
    assert metric(victim_metrics, "cfnode_stage_state", state="online") == 1
    assert h.events(victim, "online")  # it went ONLINE once, at start, and was never replaced:
    assert all(e.get("stage") != 2 for n in [*nodes, late] if n is not victim for e in h.events(n, "claimed"))
    assert not h.events(late, "claimed") and not h.events(late, "recovery_started")

    # `cfnode status` (a reader with the run's validator) shows stage 2 owned by its owner, and no forgery under
    # a plain subkey or the victim's marker
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    assert snap["model_config_hash"] != "0123456789abcdef"
    rows = [r for r in snap["stages"] if r["stage"] == 2]
    assert any(r["peer"] == victim_id and r["state"] == "ONLINE" and r["generation"] == 1 for r in rows), rows
    assert not any(r["peer"] == attacker.peer_id for r in snap["stages"]), rows
    assert not any(r["peer"] == victim_id and r["state"] == "OFFLINE" for r in rows), rows
    # (the outsider's own signed record is a valid record: status, which has no generation history, lists it)

    # and the nodes counted what they refused, by reason
    def total(reason: str) -> float:
        return sum(metric(m, "cfnode_dht_records_rejected_total", reason=reason) for m in rejected)

    assert total("not_owner") > 0  # (a) plain subkey, (c) plain meta
    assert total("unsigned") > 0  # (b) the victim's marker without a signature
    assert total("bad_signature") > 0  # (b) the victim's marker with a forged one
    # (a), signed: valid, so the DHT keeps it; the readers' generation bound drops it (records.GENERATION_SLACK)
    assert sum(metric(m, "cfnode_dht_records_dropped_total", reason="generation") for m in rejected) > 0
    for m in rejected:  # every reason is exported, at 0 if never seen
        for reason in ("not_owner", "unsigned", "bad_signature", "unparseable", "version", "expiration"):
            assert ("cfnode_dht_records_rejected_total", (("reason", reason),)) in m

    # after the attack, the swarm trains on
    after = len(steps())
    wait_until(lambda: len(steps()) >= after + 3, 120, "training after the attack")
