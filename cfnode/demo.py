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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
from tqdm import tqdm

from cfnode.config import PRESETS, GroupConfig
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
    kill: tuple[str, ...] = ()
    """STAGE@STEP: SIGKILL the process holding STAGE once STEP steps have committed (repeatable). With
    `replicas` > 1: one member of the stage's group (the longest-serving one); the group carries on, no rebuild."""
    kill_group: tuple[str, ...] = ()
    """STAGE@STEP: SIGKILL every member of STAGE's group at once, so a spare rebuilds it with CheckFree
    (repeatable). With `replicas` 1 the same as `kill`."""
    replicas: int = 1
    """Members started for every transformer stage 1..L (`join --replicas`, run-wide); stage 0 stays one node."""
    recovery_rule: str = "grad-avg"
    recovery: str = "checkfree"
    """checkfree or checkfree+ (every stage, stage 0 included, survives a kill; needs --stages >= 4), or the
    baselines checkpoint (store in WORKDIR/checkpoints) and redundant."""
    checkpoint_every: int = 50
    export_dir: str | None = None
    """Where stage 0 writes the trained model at the end (default WORKDIR/export)."""
    prompt: str = "ROMEO."
    """The prompt of the sample printed at the end (sampled with seed 0: the same model gives the same text)."""

    def kill_plan(self) -> list[Kill]:
        """Every --kill and --kill-group, in the order they are due (the order given among equal steps)."""
        plan = [_parse_kill("--kill", item, self.stages, whole_group=False) for item in self.kill]
        plan += [_parse_kill("--kill-group", item, self.stages, whole_group=True) for item in self.kill_group]
        return sorted(plan, key=lambda k: k.step)

    def __post_init__(self) -> None:
        self.kill_plan()
        if self.stages < 1:
            raise ConfigError(f"--stages must be >= 1, got {self.stages}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset {self.preset_name!r}")
        if self.recovery == "checkfree+" and self.stages < 4:
            raise ConfigError(f"--recovery checkfree+ needs --stages >= 4, got {self.stages}")
        GroupConfig(replicas=self.replicas)  # --replicas must be 1..16
        if self.kill_group and self.spares < 1:
            raise ConfigError(f"--kill-group needs a spare to rebuild the stage: --spares must be >= 1, "
                              f"got {self.spares}")


@dataclass(frozen=True)
class Kill:
    """One --kill (one member: the stage's holder with one peer per stage) or --kill-group (every member)."""

    stage: int
    step: int
    whole_group: bool


def _parse_kill(flag: str, item: str, stages: int, *, whole_group: bool) -> Kill:
    stage, sep, step = item.partition("@")
    if not sep or not stage.isdigit() or not step.isdigit():
        raise ConfigError(f"{flag} takes STAGE@STEP, e.g. 2@40; got {item!r}")
    if not 0 <= int(stage) <= stages:
        raise ConfigError(f"{flag} {item}: stage must be 0..{stages}")
    return Kill(int(stage), int(step), whole_group)


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


@dataclass
class Starter:
    """Starts the demo's nodes: stage holders, extra group members pinned to a stage, spares."""

    swarm: Swarm
    common: list[str]
    replicas: int
    spares_started: int = 0

    def node(self, name: str, stage: int) -> Proc:
        return self.swarm.spawn(name, ["join", *self.common, "--stage", str(stage)], events=True)

    def spare(self) -> Proc:
        """A spare waits as STANDBY (with groups: `--spare`, or it would join a live group) to rebuild a stage."""
        self.spares_started += 1
        extra = ["--spare"] if self.replicas > 1 else []
        return self.swarm.spawn(f"spare{self.spares_started - 1}", ["join", *self.common, *extra], events=True)

    def member(self, stage: int) -> Proc:
        """One more member of `stage`'s live group: `--stage N` with N held joins N's group by exact copy."""
        taken = sum(1 for p in self.swarm.procs if p.name.startswith(f"stage{stage}m"))
        return self.node(f"stage{stage}m{taken + 1}", stage)

    def stages(self, num_stages: int) -> None:
        """One holder per stage 0..L; with groups, the founders of 1..L first, then their extra members and
        stage 0 last, so the members join at the first step boundaries (stage 0 admits them, holding the ring
        while each copies a founder's state). Spares start after this, so they wait as STANDBY."""
        if self.replicas == 1:
            procs = [self.node(f"stage{idx}", idx) for idx in range(num_stages + 1)]
        else:
            founders = [self.node(f"stage{idx}", idx) for idx in range(1, num_stages + 1)]
            for proc in founders:
                wait_for_event(proc, "online", 180)
            members = [self.member(idx) for idx in range(1, num_stages + 1) for _ in range(self.replicas - 1)]
            procs = [self.node("stage0", 0), *members]
        for proc in procs:
            wait_for_event(proc, "online", 180)


def run_demo(options: DemoOptions) -> int:
    workdir = options.workdir or tempfile.mkdtemp(prefix="cfnode-demo-")
    os.makedirs(workdir, exist_ok=True)
    swarm = Swarm(workdir)
    export_dir = os.path.abspath(options.export_dir or os.path.join(workdir, "export"))
    exported: dict[str, Any] | None = None
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
                  "--heartbeat-ttl", str(options.heartbeat_ttl), "--recovery-rule", options.recovery_rule,
                  "--recovery", options.recovery]
        if options.recovery == "checkpoint":
            common += ["--checkpoint-dir", os.path.join(workdir, "checkpoints"),
                       "--checkpoint-every", str(options.checkpoint_every)]
        common += ["--max-steps", str(options.steps)]  # only the stage-0 holder drives, whoever it is
        common += ["--export-dir", export_dir]  # ... and exports at --max-steps, before it leaves
        common += ["--replicas", str(options.replicas)]  # run-wide: every node sizes the groups alike
        starter = Starter(swarm, common, options.replicas)
        starter.stages(options.stages)
        for _ in range(options.spares):
            starter.spare()
        code = _follow(options, swarm, starter)
        if code == 0:
            exported = _wait_for_export(swarm)
    except KeyboardInterrupt:
        logger.warning("interrupted; stopping every process the demo started")
        code = 130
    finally:
        swarm.stop()
        signal.signal(signal.SIGTERM, previous)
    summary = _summary(options, swarm, started)
    summary.update(_results(options, summary, workdir, export_dir if exported else None))
    if options.json_summary:
        with open(options.json_summary, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    logger.info("demo finished: %d steps, loss %s -> %s, val loss %s -> %s, %.0f tokens/s, logs in %s",
                summary["steps_completed"], _fmt(summary["loss_first"]), _fmt(summary["loss_last"]),
                _fmt(summary["val_loss_first"]), _fmt(summary["val_loss_last"]), summary["tokens_per_s"] or 0,
                workdir)
    if summary["loss_png"]:
        click.echo(f"loss curve:  {summary['loss_png']}")
    if summary["export_dir"]:
        click.echo(f"model:       {summary['export_dir']}  (step {exported['step'] if exported else '-'}; "
                   f"cfnode generate --model {summary['export_dir']} --prompt '...')")
    if summary["sample"] is not None:
        click.echo(f"sample:      {summary['sample']!r}")
    return code


EXPORT_WAIT_S = 600.0


def _wait_for_export(swarm: Swarm) -> dict[str, Any] | None:
    """Stage 0 exports after its last step and then exits: wait for its `exported` event (None if it failed)."""
    proc = next((p for p in swarm.procs if any(e["event"] == "training_finished" for e in read_events(p.events_path))),
                None)
    if proc is None:
        return None
    deadline = time.monotonic() + EXPORT_WAIT_S
    while time.monotonic() < deadline:
        done = [e for e in read_events(proc.events_path) if e["event"] == "exported"]
        if done:
            return done[-1]
        if not proc.alive():
            break
        time.sleep(0.25)
    logger.error("stage 0 did not export the model; see %s", proc.log_path)
    return None


def _results(options: DemoOptions, summary: dict[str, Any], workdir: str, export_dir: str | None) -> dict[str, Any]:
    """What the run produced: loss.png, the export (annotated with how stages were rebuilt) and a sample."""
    out: dict[str, Any] = {"loss_png": None, "export_dir": export_dir, "sample": None}
    try:
        out["loss_png"] = write_loss_plot(os.path.join(workdir, "loss.png"), summary)
    except Exception as e:  # noqa: BLE001 - a failed plot must not hide the run's result
        logger.warning("could not draw loss.png: %s", e)
    if export_dir is None:
        return out
    from cfnode.export import annotate_rebuilds
    from cfnode.generate import GenerateOptions, generate_text

    rebuilt = {e["stage"]: e.get("how") or e.get("rule") for e in summary["events"]
               if e["event"] == "recovery_finished"}
    annotate_rebuilds(export_dir, rebuilt)
    out["sample"] = generate_text(GenerateOptions(model_dir=export_dir, prompt=options.prompt, max_new_tokens=48,
                                                  temperature=0.8, seed=0))
    return out


def write_loss_plot(path: str, summary: dict[str, Any]) -> str:
    """Train and validation loss vs step; kills (red dashed) and finished rebuilds (green dotted) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: dict[int, dict[str, Any]] = {e["step"]: e for e in summary["steps"]}  # a retried step: the last
    xs = sorted(steps)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.plot(xs, [steps[x]["loss"] for x in xs], "-", color="tab:blue", linewidth=1.2, label="train loss")
    val = [(x, steps[x]["val_loss"]) for x in xs if steps[x].get("val_loss") is not None]
    if val:
        ax.plot([x for x, _ in val], [v for _, v in val], "o-", color="tab:orange", markersize=4,
                label="validation loss")
    for i, kill in enumerate(summary.get("kills", [])):
        ax.axvline(kill["killed_at_step"], color="tab:red", linestyle="--", linewidth=1,
                   label="kill -9 of a stage" if i == 0 else None)
        ax.annotate(f"kill {kill['stage']}", (kill["killed_at_step"], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", color="tab:red", fontsize=8)
    rebuilds = [e for e in summary["events"] if e["event"] == "recovery_finished"]
    for i, e in enumerate(rebuilds):
        ax.axvline(e.get("step", 0), color="tab:green", linestyle=":", linewidth=1.5,
                   label="stage rebuilt" if i == 0 else None)
        ax.annotate(f"rebuilt {e['stage']} ({e.get('how') or e.get('rule')})", (e.get("step", 0), 1),
                    xycoords=("data", "axes fraction"), xytext=(3, -24), textcoords="offset points",
                    color="tab:green", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    ax.set_title(f"cfnode demo: {summary['steps_completed']} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def holders(procs: list[Proc]) -> dict[int, Proc]:
    """Which live process serves each stage, from the processes' own events (latest ONLINE wins)."""
    latest: dict[int, tuple[float, Proc]] = {}
    for proc in procs:
        if not proc.alive():
            continue
        events = read_events(proc.events_path)
        online = [e for e in events if e["event"] == "online"]
        if not online or any(e["event"] == "fenced" and e["ts"] >= online[-1]["ts"] for e in events):
            continue
        stage = online[-1]["stage"]
        if stage not in latest or online[-1]["ts"] > latest[stage][0]:
            latest[stage] = (online[-1]["ts"], proc)
    return {stage: proc for stage, (_, proc) in latest.items()}


def _follow(options: DemoOptions, swarm: Swarm, spawn_spare: Callable[[], Proc]) -> int:
    bar = tqdm(total=options.steps, desc="training", unit="step", dynamic_ncols=True)
    last_step, last_step_ts, val = 0, 0.0, None
    pending = sorted(options.kill_plan(), key=lambda k: k[1])
    try:
        while True:
            nodes = [p for p in swarm.procs if p.events_path]
            held = holders(nodes)
            head = held.get(0)
            events = read_events(head.events_path) if head else []
            steps = [e for e in events if e["event"] == "step"]
            for e in steps:
                if e.get("val_loss") is not None:
                    val = e["val_loss"]
            if steps:
                last_step_ts = max(last_step_ts, steps[-1]["ts"])
            if steps and steps[-1]["step"] > last_step:
                e = steps[-1]
                bar.update(e["step"] - last_step)
                last_step = e["step"]
                stage_map = " ".join(f"{i}{'+' if i in held else 'x'}" for i in range(options.stages + 1))
                spares = sum(1 for p in nodes if p.alive()) - len(held)
                bar.set_postfix_str(f"loss {e['loss']:.3f} val {_fmt(val)} {e['tokens_per_s']:.0f} tok/s "
                                    f"stages {stage_map} spares {spares}")
            while pending and last_step >= pending[0][1] and pending[0][0] in held:
                stage, at_step = pending.pop(0)
                victim = held[stage]
                logger.warning("--kill %d@%d: SIGKILL of %s (pid %d), which holds stage %d", stage, at_step,
                               victim.name, victim.popen.pid, stage)
                _signal_group(victim.popen.pid, signal.SIGKILL)
                swarm.kills.append({"stage": stage, "at_step": at_step, "killed_at_step": last_step,
                                    "ts": time.time(), "node": victim.name, "respawned": False})
            for kill in swarm.kills:  # a volunteer comes back once the rebuild is done, so later kills find a
                if kill["respawned"]:  # spare too (starting it earlier would compete with the rebuild for CPU)
                    continue
                if any(e["event"] == "recovery_finished" and e["ts"] >= kill["ts"]
                       for p in nodes for e in read_events(p.events_path)):
                    kill["respawned"] = True
                    spawn_spare()
            if any(e["event"] == "training_finished" for e in events):
                return 0
            if head is None and last_step > 0 and _unrecoverable_reported(nodes, last_step_ts):
                logger.error("stage 0 (embedding/head/data) is gone and cannot be rebuilt (it can with "
                             "--recovery checkfree+); the swarm cannot continue. Logs: %s", swarm.workdir)
                return EXIT_UNRECOVERABLE
            time.sleep(0.25)
    finally:
        bar.close()


def _unrecoverable_reported(nodes: list[Proc], since: float) -> bool:
    """A live node reported, after the last committed step, that the swarm lost state it cannot rebuild (under
    checkfree+ a lost stage 0 is rebuilt instead, and nobody reports this)."""
    return any(e["event"] == "unrecoverable" and e["ts"] >= since
               for p in nodes if p.alive() for e in read_events(p.events_path))


def _recoveries(swarm: Swarm, all_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per --kill: detection, rebuild and kill-to-serving times, from the nodes' own events."""
    out = []
    steps = sorted((e for e in all_events if e["event"] == "step"), key=lambda e: e["ts"])
    for kill in swarm.kills:
        t0 = kill["ts"]
        detected = [e["ts"] for e in all_events if e["ts"] >= t0 and e["event"] in (
            "neighbour_unreachable", "neighbour_lost", "step_aborted", "waiting_for_stage")]
        finished = sorted((e for e in all_events if e["event"] == "recovery_finished" and e["ts"] >= t0
                           and e.get("stage") == kill["stage"]), key=lambda e: e["ts"])
        row: dict[str, Any] = {"stage": kill["stage"], "killed_at_step": kill["killed_at_step"],
                               "detect_s": round(min(detected) - t0, 3) if detected else None,
                               "rule": None, "rebuild_s": None, "serving_s": None, "steps_aborted": None}
        if finished:
            f = finished[0]
            row.update(rule=f.get("rule"), how=f.get("how"), rebuild_s=f.get("duration_s"),
                       fetch_s=f.get("fetch_s"), generation=f.get("generation"))
            served = [e for e in steps if e["ts"] >= f["ts"]]
            if served:
                row["serving_s"] = round(served[0]["ts"] - t0, 3)
                row["steps_aborted"] = sum(1 for e in all_events if e["event"] == "step_aborted"
                                           and t0 <= e["ts"] <= served[0]["ts"])
                before = [e["loss"] for e in steps if e["ts"] < t0][-5:]
                after = [e["loss"] for e in served[:5]]
                row["loss_before"] = round(sum(before) / len(before), 4) if before else None
                row["loss_after"] = round(sum(after) / len(after), 4) if after else None
        out.append(row)
    return out


def _summary(options: DemoOptions, swarm: Swarm, started: float) -> dict[str, Any]:
    all_events = []
    for proc in swarm.procs:
        for e in read_events(proc.events_path):
            all_events.append({**e, "node": proc.name})
    steps = sorted((e for e in all_events if e["event"] == "step"), key=lambda e: e["ts"])
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
        "recoveries": _recoveries(swarm, all_events),
        "steps": [{k: e.get(k) for k in ("step", "loss", "val_loss")} for e in steps],
        "kills": [dict(k) for k in swarm.kills],  # each --kill as done: stage, at_step, killed_at_step, ts, node
        "events": sorted((e for e in all_events if e["event"] != "step"), key=lambda e: e["ts"]),
    }
