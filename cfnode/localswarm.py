"""Local swarms of real processes (the demo, the experiment, the benchmarks and the loopback tests use them):
spawning `cfnode` commands in their own process groups that die with their parent, following their logs and
JSON-lines event files, and stopping every process group that was started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)
JOIN_LINE = re.compile(r"To join this swarm: cfnode join --peers (\S+)")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: str
    events_path: str | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Swarm:
    """Processes started by the demo (or by tests through the same helpers)."""

    workdir: str
    procs: list[Proc] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], *, events: bool = False) -> Proc:
        log_path = os.path.join(self.workdir, f"{name}.log")
        events_path = os.path.join(self.workdir, f"{name}.events.jsonl") if events else None
        cmd = [sys.executable, "-m", "cfnode", *args]
        if events_path:
            cmd += ["--events-file", events_path]
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     preexec_fn=_die_with_parent)
        proc = Proc(name, popen, log_path, events_path)
        self.procs.append(proc)
        return proc

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every main process we started (a graceful leave: OFFLINE record, DHT and p2pd shut down by
        their owner), then SIGKILL each whole process group for anything left; reap all."""
        for proc in self.procs:
            if proc.alive():
                try:
                    proc.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            signal_group(proc.popen.pid, signal.SIGKILL)  # also reaps DHT children and p2pd of the group
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("process %s (pid %d) did not exit", proc.name, proc.popen.pid)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (a graceful leave) if the demo itself is killed, even by
    SIGKILL, so no node outlives it. Linux only; elsewhere the demo's own cleanup is all there is."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_line(proc: Proc, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
    """Poll a process's log until a line matches (or the process dies / time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(proc.log_path, encoding="utf-8", errors="replace") as f:
            match = pattern.search(f.read())
        if match:
            return match
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} did not print {pattern.pattern!r} within {timeout_s}s; see {proc.log_path}")


def wait_for_event(proc: Proc, event: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in read_events(proc.events_path):
            if e["event"] == event:
                return e
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
        time.sleep(0.1)
    raise TimeoutError(f"{proc.name} did not report {event!r} within {timeout_s}s; see {proc.log_path}")


def read_events(path: str | None) -> list[dict[str, Any]]:
    if not path or not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written
    return out
