"""Loopback swarm harness: real `cfnode` processes on 127.0.0.1, each in its own process group.

Waits poll a condition with a deadline (never a bare sleep) and report what they last saw on timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
from prometheus_client.parser import text_string_to_metric_families

from cfnode.localswarm import JOIN_LINE, Proc, Swarm, read_events, wait_for_line

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {last!r}")


class Harness:
    def __init__(self, workdir: str, run_id: str, extra: tuple[str, ...] = (), stages: int = 2,
                 ttl_s: float = 3.0, period_s: float = 0.5) -> None:
        self.stages = stages
        self.ttl_s = ttl_s
        self.period_s = period_s
        self.workdir = workdir
        self.run_id = run_id
        self.swarm = Swarm(workdir)
        self.bootstrap_maddr: str | None = None
        self.bootstrap_metrics_port: int | None = None
        self.extra = extra
        self.reader_identity, self.reader_peer_id = make_identity(os.path.join(workdir, "reader.id"))
        """The test's own peer, allowed to fetch weights (`--weights-reader`): an outsider is refused."""

    def start_bootstrap(self, *args: str) -> str:
        proc = self.swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                              "--identity-path", os.path.join(self.workdir, "boot.id"), *args])
        self.bootstrap_maddr = wait_for_line(proc, JOIN_LINE, 60).group(1)
        if "--metrics-port" in args:  # printed right after the join line
            self.bootstrap_metrics_port = int(wait_for_line(proc, METRICS_LINE, 30).group(1))
        return self.bootstrap_maddr

    def join_args(self, *args: str) -> list[str]:
        assert self.bootstrap_maddr
        return ["join", "--peers", self.bootstrap_maddr, "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                "--metrics-port", "0", "--weights-reader", self.reader_peer_id, *self.run_args(*args)]

    def run_args(self, *args: str) -> list[str]:
        """The `cfnode join` flags of this swarm's nodes that are not about the network (what the local engine of
        `cfnode experiment` needs to configure its in-process nodes alike)."""
        return ["--run-id", self.run_id, "--preset", "tiny", "--stages", str(self.stages), "--threads", "1",
                "--heartbeat-period", str(self.period_s), "--heartbeat-ttl", str(self.ttl_s), "--microbatches", "4",
                "--microbatch-size", "4", "--val-every", "10", "--step-timeout", "15",
                "--request-timeout", "5", *self.extra, *args]

    def start_node(self, name: str, *args: str) -> Proc:
        ready = os.path.join(self.workdir, f"{name}.ready.json")
        proc = self.swarm.spawn(name, [*self.join_args(*args), "--ready-file", ready], events=True)
        proc.ready_path = ready  # type: ignore[attr-defined]
        return proc

    def ready_info(self, proc: Proc, timeout_s: float = 90) -> dict[str, Any]:
        path = proc.ready_path  # type: ignore[attr-defined]

        def _read() -> dict[str, Any] | None:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{tail(proc.log_path)}")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            return None

        return wait_until(_read, timeout_s, f"{proc.name} to become ready")

    def events(self, proc: Proc, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(proc.events_path) if name is None or e["event"] == name]

    def stop(self) -> None:
        self.swarm.stop()

    def leftovers(self) -> list[str]:
        """Processes of any group we started that are still alive (DHT children and p2pd included)."""
        out = []
        pgids = {p.popen.pid for p in self.swarm.procs}
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "<no log>"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def run_cli(*args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfnode", *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, start_new_session=True)


def kill_group(proc: Proc, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.popen.pid, sig)


JOIN_RE = re.compile(r"^To join this swarm: cfnode join --peers (\S+)$", re.M)
METRICS_LINE = re.compile(r"^metrics port (\d+)$", re.M)


def make_identity(path: str) -> tuple[str, str]:
    """A libp2p identity file and its peer id."""
    from hivemind.p2p import P2P, PeerID

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        P2P.generate_identity(path)
    with open(path, "rb") as f:
        return path, PeerID.from_identity(f.read()).to_base58()


async def _fetch_weights(maddrs: list[str], peer_ids: list[str], replica: bool,
                         identity: str | None) -> list[tuple[dict, dict]]:
    from hivemind.p2p import P2P

    from cfnode.config import NetworkConfig
    from cfnode.metrics import NodeMetrics
    from cfnode.net.client import StageClient

    p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=identity)
    try:
        client = StageClient(p2p, NetworkConfig(request_timeout_s=10), NodeMetrics())
        return [await client.get_weights(pid, max_bytes=2**30, timeout_s=30, replica=replica) for pid in peer_ids]
    finally:
        await p2p.shutdown()


def fetch_weights(infos: list[dict[str, Any]], *, replica: bool = False,
                  identity: str | None = None) -> list[tuple[dict, dict]]:
    """rpc_get_weights from each node (given its ready info), from a peer outside the run (with `identity`, the
    harness's `--weights-reader`; without, a stranger, which is refused); with `replica`, the stage-0 replica
    each holds (CheckFree+)."""
    import asyncio

    return asyncio.run(_fetch_weights([i["maddrs"][0] for i in infos], [i["peer_id"] for i in infos], replica,
                                      identity))
