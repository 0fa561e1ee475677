"""`cfnode demo`: the main job in one command. Starts a bootstrap, L+1 stage nodes and spares as real OS
processes on 127.0.0.1, follows stage 0's event log with a progress bar, and stops everything it started
(SIGTERM, then SIGKILL of each process group) on exit, error or Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cfnode.config import PRESETS
from cfnode.errors import EXIT_UNRECOVERABLE, ConfigError

logger = logging.getLogger(__name__)
JOIN_LINE = re.compile(r"To join this swarm: cfnode join --peers (\S+)")


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    stages: int = 4
    steps: int = 300
    preset_name: str = "small"
    workdir: str | None = None
    json_summary: str | None = None
    spares: int = 1
    microbatches: int = 4
    microbatch_size: int = 8
    lr: float = 1e-3
    val_every: int = 25
    heartbeat_period: float = 2.0
    heartbeat_ttl: float = 8.0

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset_name!r}")


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
            _signal_group(proc.popen.pid, signal.SIGKILL)  # also reaps DHT children and p2pd of the group
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


def _signal_group(pid: int, sig: int) -> None:
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


def run_demo(options: DemoOptions) -> int:
    workdir = options.workdir or tempfile.mkdtemp(prefix="cfnode-demo-")
    os.makedirs(workdir, exist_ok=True)
    swarm = Swarm(workdir)
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill <demo>` cleans up like Ctrl-C
    logger.info("demo workdir: %s", workdir)
    try:
        boot = swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                         "--identity-path", os.path.join(workdir, "bootstrap.id")])
        peer = wait_for_line(boot, JOIN_LINE, 60).group(1)
        common = ["--peers", peer, "--preset", options.preset_name, "--stages", str(options.stages),
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", "demo", "--threads", "1",
                  "--microbatches", str(options.microbatches), "--microbatch-size", str(options.microbatch_size),
                  "--lr", str(options.lr), "--val-every", str(options.val_every),
                  "--heartbeat-period", str(options.heartbeat_period),
                  "--heartbeat-ttl", str(options.heartbeat_ttl)]
        common += ["--max-steps", str(options.steps)]  # only the stage-0 holder drives, whoever it is
        stage_procs = [swarm.spawn(f"stage{idx}", ["join", *common, "--stage", str(idx)], events=True)
                       for idx in range(options.stages + 1)]
        for proc in stage_procs:  # spares start once every stage is held, so they wait as STANDBY
            wait_for_event(proc, "online", 180)
        spares = [swarm.spawn(f"spare{i}", ["join", *common], events=True) for i in range(options.spares)]
        code = _follow(options, stage_procs, spares)
    except KeyboardInterrupt:
        logger.warning("interrupted; stopping every process the demo started")
        code = 130
    finally:
        swarm.stop()
        signal.signal(signal.SIGTERM, previous)
    summary = _summary(options, swarm, started)
    if options.json_summary:
        with open(options.json_summary, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    logger.info("demo finished: %d steps, loss %s -> %s, val loss %s -> %s, %.0f tokens/s, logs in %s",
                summary["steps_completed"], _fmt(summary["loss_first"]), _fmt(summary["loss_last"]),
                _fmt(summary["val_loss_first"]), _fmt(summary["val_loss_last"]), summary["tokens_per_s"] or 0,
                workdir)
    return code


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _follow(options: DemoOptions, stage_procs: list[Proc], spares: list[Proc]) -> int:
    head = stage_procs[0]
    bar = tqdm(total=options.steps, desc="training", unit="step", dynamic_ncols=True)
    last_step, val = 0, None
    try:
        while True:
            events = read_events(head.events_path)
            steps = [e for e in events if e["event"] == "step"]
            for e in steps:
                if e.get("val_loss") is not None:
                    val = e["val_loss"]
            if steps and steps[-1]["step"] > last_step:
                e = steps[-1]
                bar.update(e["step"] - last_step)
                last_step = e["step"]
                stage_map = " ".join(f"{i}{'+' if p.alive() else 'x'}" for i, p in enumerate(stage_procs))
                bar.set_postfix_str(f"loss {e['loss']:.3f} val {_fmt(val)} {e['tokens_per_s']:.0f} tok/s "
                                    f"stages {stage_map} spares {sum(p.alive() for p in spares)}")
            if any(e["event"] == "training_finished" for e in events):
                return 0
            if not head.alive():
                logger.error("stage 0 (embedding/head/data) exited with %s; the swarm cannot continue. See %s",
                             head.popen.returncode, head.log_path)
                return EXIT_UNRECOVERABLE
            time.sleep(0.25)
    finally:
        bar.close()


def _summary(options: DemoOptions, swarm: Swarm, started: float) -> dict[str, Any]:
    all_events = []
    for proc in swarm.procs:
        for e in read_events(proc.events_path):
            all_events.append({**e, "node": proc.name})
    steps = [e for e in all_events if e["event"] == "step" and e["node"] == "stage0"]
    vals = [e["val_loss"] for e in steps if e.get("val_loss") is not None]
    timed = steps[1:] if len(steps) > 1 else steps
    tokens_per_s = None
    if len(timed) >= 2:
        per_step = (timed[-1]["time"] - timed[0]["time"]) / (len(timed) - 1)
        tokens = options.microbatches * options.microbatch_size * PRESETS[options.preset_name].seq_len
        tokens_per_s = tokens / per_step if per_step > 0 else None
    return {
        "steps_completed": steps[-1]["step"] if steps else 0,
        "loss_first": steps[0]["loss"] if steps else None,
        "loss_last": steps[-1]["loss"] if steps else None,
        "val_loss_first": vals[0] if vals else None,
        "val_loss_last": vals[-1] if vals else None,
        "tokens_per_s": tokens_per_s,
        "wall_s": round(time.time() - started, 1),
        "events": sorted((e for e in all_events if e["event"] != "step"), key=lambda e: e["ts"]),
    }
