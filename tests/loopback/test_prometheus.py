"""A real Prometheus server scrapes a real swarm on 127.0.0.1 while a transformer stage is SIGKILLed.

Swarm: bootstrap + stages 0..3 (`--preset tiny --stages 3`) + one STANDBY spare, every process with
`--metrics-port 0` (nodes report the bound port in their `joined` event and ready file, the bootstrap prints
`metrics port N`). Debian's `prometheus` scrapes them every second; the test reads everything through its HTTP
API, the way an operator's dashboard would: the fault fired (the victim is dead, its whole process group gone,
its target down, its peer id gone from the DHT), a spare rebuilt the stage (recoveries +1 exactly), the
neighbours counted exactly one failure each, and stage 0 kept committing steps after the rebuild.
`promtool check metrics` must accept every node's and the bootstrap's exposition, and `cfnode status --watch`
shows the stage map and the spare.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest

from cfnode.localswarm import Proc, _die_with_parent
from tests.support.swarm import Harness, kill_group, run_cli, tail, wait_until

pytestmark = [pytest.mark.loopback, pytest.mark.fault]
RUN = "prom"
TTL = 6.0
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="`promtool` is not installed (Debian: apt-get install prometheus)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):
    # ttl 6 s (period 0.5 s): heartbeats stalled by a loaded 2-core machine rarely expire a live node's record
    h = Harness(str(tmp_path_factory.mktemp("promswarm")), RUN, stages=3, ttl_s=TTL)
    try:
        h.start_bootstrap("--metrics-port", "0")
        nodes = [h.start_node(f"node{i}", "--stage", str(i)) for i in range(4)]
        infos = [h.ready_info(n) for n in nodes]
        h.by_stage = {info["stage"]: (node, info) for node, info in zip(nodes, infos, strict=True)}  # type: ignore[attr-defined]
        spare = h.start_node("spare")
        joined = wait_until(lambda: h.events(spare, "joined"), 120, "the spare's joined event")[0]
        wait_until(lambda: h.events(spare, "standby"), 120, "the spare to wait as STANDBY")
        h.spare = spare  # type: ignore[attr-defined]
        h.spare_peer = joined["peer_id"]  # type: ignore[attr-defined]
        targets = {"bootstrap": h.bootstrap_metrics_port, "spare": joined["metrics_port"]}
        targets.update({f"node{i}": h.by_stage[i][1]["metrics_port"] for i in range(4)})
        assert all(isinstance(p, int) and p > 0 for p in targets.values()), targets
        h.targets = targets  # type: ignore[attr-defined]
        yield h
    finally:
        h.stop()
        left = h.leftovers()
        assert not left, f"processes survived teardown: {left}"


class Prometheus:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log_path: str) -> None:
        self.port, self.proc, self.log_path = port, proc, log_path

    def series(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant query through the HTTP API: (labels, value) of every series it returns."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.load(resp)
        assert data["status"] == "success", data
        return [(r["metric"], float(r["value"][1])) for r in data["data"]["result"]]

    def by(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """{(values of `labels`) -> value}; the labels must tell the series apart."""
        found = self.series(expr)
        out = {tuple(m.get(k, "") for k in labels): v for m, v in found}
        assert len(out) == len(found), (expr, labels, found)
        return out

    def value(self, expr: str) -> float | None:
        """The single value of a query that selects one series (None while it has no sample)."""
        result = self.series(expr)
        assert len(result) <= 1, (expr, result)
        return result[0][1] if result else None


@pytest.fixture(scope="module")
def prometheus(swarm: Harness, tmp_path_factory: pytest.TempPathFactory):
    assert PROMETHEUS is not None
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "cfnode", "static_configs": [
            {"targets": [f"127.0.0.1:{port}"], "labels": {"name": name}}
            for name, port in swarm.targets.items()]}],  # type: ignore[attr-defined]
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=1))
    port = _free_port()
    log_path = str(workdir / "prometheus.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                                 "--log.level=warn"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)  # no orphan if pytest dies
    prom = Prometheus(port, proc, log_path)
    try:
        def _ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_until(_ready, 60, "prometheus to be ready", poll_s=0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        assert proc.poll() is not None


def _scrape_text(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read()


def _promtool_check(text: bytes) -> tuple[int, str]:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    return out.returncode, (out.stdout + out.stderr).decode()


@needs_promtool
def test_promtool_accepts_every_node_and_the_bootstrap(swarm: Harness) -> None:
    head = swarm.by_stage[0][0]  # type: ignore[attr-defined]
    wait_until(lambda: len(swarm.events(head, "step")) >= 3, 240, "3 committed steps (histograms filled)")
    for name, port in swarm.targets.items():  # type: ignore[attr-defined]
        text = _scrape_text(port)
        assert b"cfnode_build_info{" in text and b"cfnode_dht_peers " in text, name
        code, output = _promtool_check(text)
        assert code == 0 and not output.strip(), f"promtool on {name}: {output}"


def test_status_watch_shows_stages_and_the_spare(swarm: Harness) -> None:
    out = run_cli("status", "--peers", swarm.bootstrap_maddr, "--run-id", RUN, "--heartbeat-ttl", "3",
                  "--watch", "0.5", "--count", "2", "--json")
    assert out.returncode == 0, out.stderr
    frames = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(frames) == 2, out.stdout
    for frame in frames:
        assert frame["online_stages"] == [0, 1, 2, 3] and frame["recovering"] == [], frame
        assert frame["spares"] == [swarm.spare_peer], frame  # type: ignore[attr-defined]


def _group_alive(pgid: int) -> list[int]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@needs_prometheus
@pytest.mark.timeout(600)
def test_prometheus_sees_a_stage_killed_rebuilt_and_training_go_on(swarm: Harness, prometheus: Prometheus) -> None:
    h, prom = swarm, prometheus
    names = set(h.targets)  # type: ignore[attr-defined]
    victim, victim_info = h.by_stage[2]  # type: ignore[attr-defined]
    failures = "cfnode_stage_failures_detected_total"

    # -- before: every target is up and training runs, as seen by Prometheus
    wait_until(lambda: prom.by("up", "name") == {(n,): 1.0 for n in names}, 60, "prometheus to scrape every target",
               poll_s=0.5)
    wait_until(lambda: (prom.value('cfnode_training_step{name="node0"}') or 0) >= 8, 240,
               "stage 0 to commit 8 steps", poll_s=0.5)
    wait_until(lambda: (prom.value('cfnode_dht_peers{name="bootstrap"}') or 0) >= 5, 60,
               "the bootstrap's routing table to hold the five nodes", poll_s=0.5)
    dht_peers = prom.by("cfnode_dht_peers", "name")
    assert set(dht_peers) == {(n,) for n in names} and min(dht_peers.values()) >= 1, dht_peers
    assert prom.value('cfnode_stage_state{name="spare",state="standby"}') == 1
    assert prom.value('cfnode_stage_index{name="spare"}') == -1
    # every failure counted so far is a real incident with its neighbour_lost event (a neighbour that never had
    # an owner at start-up is not one; a live node whose heartbeats stalled past the ttl would be)
    survivors = ("node0", "node1", "node3", "spare")
    wait_until(lambda: prom.by(failures, "name", "neighbor") == _lost_events(h, (*survivors, "node2")), 10,
               "cfnode_stage_failures_detected_total to match the neighbour_lost events", poll_s=0.5)
    before = prom.by(failures, "name", "neighbor")
    assert prom.value('sum(cfnode_recoveries_total{result="success"})') == 0
    assert prom.by('cfnode_node_info{role="bootstrap"}', "name") == {("bootstrap",): 1.0}
    assert prom.by('cfnode_node_info{role="stage"}', "name").keys() == {(n,) for n in names - {"bootstrap"}}

    # -- the fault: the whole machine of stage 2 dies (main process, DHT child, p2pd)
    killed_at = time.time()
    kill_group(victim)
    assert victim.popen.wait(timeout=10) == -9
    wait_until(lambda: not _group_alive(victim.popen.pid), 15, "every process of the victim's group to die")
    wait_until(lambda: prom.value('up{name="node2"}') == 0, 30, "prometheus to see node2 down", poll_s=0.5)
    # its neighbours see its record expire: one detection each, on the side facing stage 2
    wait_until(lambda: prom.value(f'{failures}{{name="node1",neighbor="next"}}') == before[("node1", "next")] + 1
               and prom.value(f'{failures}{{name="node3",neighbor="prev"}}') == before[("node3", "prev")] + 1,
               60, "stages 1 and 3 to detect the loss of stage 2", poll_s=0.5)

    # -- the rebuild: the spare takes stage 2 (recoveries_total +1), and training goes on
    wait_until(lambda: prom.value('sum(cfnode_recoveries_total{result="success"})') == 1, 120,
               "cfnode_recoveries_total{result=success} to reach 1", poll_s=0.5)
    assert prom.value('cfnode_recoveries_total{name="spare",role="recovered",rule="grad-avg",result="success"}') == 1
    assert prom.value('cfnode_recovery_duration_seconds_count{name="spare"}') == 1
    at_recovery = prom.value('cfnode_training_step{name="node0"}') or 0
    wait_until(lambda: (prom.value('cfnode_training_step{name="node0"}') or 0) >= at_recovery + 5, 180,
               f"stage 0 to commit 5 more steps after the rebuild (from {at_recovery})", poll_s=0.5)
    wait_until(lambda: (prom.value('cfnode_training_step{name="spare"}') or 0) > 0, 60,
               "the rebuilt stage to commit steps", poll_s=0.5)
    assert prom.value('cfnode_stage_index{name="spare"}') == 2
    assert prom.value('cfnode_stage_generation{name="spare"}') == 2  # the initial holders run at generation 1
    assert prom.value('cfnode_stage_state{name="spare",state="online"}') == 1
    assert prom.value('cfnode_swarm_stages_online{name="node0"}') == 4

    # -- the victim's peer is gone from the DHT: stage 2 is held by the spare, the victim's id nowhere
    out = run_cli("status", "--peers", h.bootstrap_maddr, "--run-id", RUN, "--json", "--heartbeat-ttl", str(TTL))
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert victim_info["peer_id"] not in {r["peer"] for r in snap["stages"]}, snap
    assert {r["stage"]: r["peer"] for r in snap["stages"] if r["state"] == "ONLINE"}[2] == h.spare_peer  # type: ignore[attr-defined]

    # -- exact counts after the incident: the loss of stage 2 was detected exactly once by each neighbour and by
    # nobody else, and the counters equal the neighbour_lost events one for one
    def stage2_lost(name: str) -> list[str]:
        return [e["side"] for e in h.events(_proc(h, name), "neighbour_lost") if e["stage"] == 2 and e["ts"] >= killed_at]

    assert {name: stage2_lost(name) for name in survivors} == {"node0": [], "node1": ["next"], "node3": ["prev"],
                                                                 "spare": []}
    wait_until(lambda: prom.by(failures, "name", "neighbor") == _lost_events(h, survivors), 10,
               "cfnode_stage_failures_detected_total to match the neighbour_lost events", poll_s=0.5)
    after = prom.by(failures, "name", "neighbor")
    assert after[("node1", "next")] - before[("node1", "next")] >= 1
    assert after[("node3", "prev")] - before[("node3", "prev")] >= 1
    assert prom.by('sum by (name) (cfnode_recoveries_total{name!="spare"})', "name") == {
        (n,): 0.0 for n in ("node0", "node1", "node3")}
    for name in ("node0", "node1", "node3", "spare"):
        code, output = _promtool_check(_scrape_text(h.targets[name]))  # type: ignore[attr-defined]
        assert code == 0 and not output.strip(), f"promtool on {name} after the rebuild: {output}"
    head_log = open(h.by_stage[0][0].log_path, encoding="utf-8").read()  # type: ignore[attr-defined]
    assert "Traceback" not in head_log, tail(h.by_stage[0][0].log_path)  # type: ignore[attr-defined]


def _proc(h: Harness, name: str) -> Proc:
    if name == "spare":
        return h.spare  # type: ignore[attr-defined]
    return h.by_stage[int(name.removeprefix("node"))][0]  # type: ignore[attr-defined]


def _lost_events(h: Harness, names: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """{(node, side) -> number of its neighbour_lost events}, for every node and side."""
    out = {(name, side): 0.0 for name in names for side in ("prev", "next")}
    for name in names:
        for e in h.events(_proc(h, name), "neighbour_lost"):
            out[(name, e["side"])] += 1
    return out
