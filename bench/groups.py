#!/usr/bin/env python
"""What a stage group costs: one cfnode swarm with one peer per stage (K=1) and then one with two (K=2), same model,
seed, data and schedule, side by side, on this machine; plus a projection of K=2 on machines where every member
has its own core.

    .venv/bin/python bench/groups.py --preset tiny --stages 2
    .venv/bin/python bench/groups.py --preset small --stages 2 --steps 20 --wait-quiet 60
    .venv/bin/python bench/groups.py --from-json bench/results-groups-small-L2.json --hop-ms 2 --averaging-ms 100

(the last one runs nothing: it reprints a result and redoes its projection for another link). The script waits while
/tmp/cfnode_ci.lock exists, and with --wait-quiet S up to S seconds for an idle machine before each phase.

Each swarm is real processes on 127.0.0.1 (as `bench/throughput.py`): `cfnode bootstrap`, then the founders of
stages 1..L (`cfnode join --stage i --replicas K --threads 1 --val-every 0 --metrics-port 0 --ready-file ...`), then
K-1 more nodes per transformer stage (`--stage i` of an occupied stage joins its group), then stage 0 last, so
the newcomers join before the first steps. The timed window starts at the first step boundary after `--warmup`
steps at which every newcomer has been in its group (event `joined_group`) for two committed steps, and covers
`--steps` committed steps; the swarm is then stopped.

Measured over the window, per committed step (counters are read from every node's Prometheus endpoint at the
window's start and end; each node's differences are divided by the steps that node committed between its own two
scrapes, `cfnode_steps_committed_total`, since scraping every node takes about as long as a tiny step):

* step time: median, p90 and mean of the intervals between stage 0's `step` events (`time`), tokens/s of the
  median step and of the window; stage 0's own `step_s` (the attempt, without what happens between attempts);
* bytes sent: `cfnode_transfer_bytes_total{direction="sent"}` summed over all nodes, by kind. The all-reduce's
  own traffic goes through hivemind and is not metered by cfnode: `averaging_bytes_est` is its size for a
  butterfly all-reduce of the stage's float64 buffer without compression (hivemind's default; cfnode passes none):
  every member sends (K-1)/K of its vector to the other reducers and gets as much back, i.e. 16 (K-1) N bytes per
  group of a stage with N parameters and per prepare;
* averaging time: `cfnode_group_averaging_duration_seconds` sum/count on every member (one observation per
  prepare: `gradient_vector` + hivemind's matchmaking and all-reduce, not the clipping afterwards);
* hop and commit RPC latency: `cfnode_rpc_duration_seconds{side="client"}` sum/count (a hop = pushing one
  activation or gradient until the receiver acked it; the receiver computes after the ack);
* CPU per step of every node, split by thread with psutil (Linux per-thread times): the compute thread (the
  node's one `cfnode-compute` executor thread: all torch work, identified as the busiest thread other than the
  main one), the main thread (the asyncio loop: protobuf/msgpack framing, tensor decode and validation, RPC
  handlers), the node's other threads, and its children (the DHT process, p2pd, hivemind's averager process);
* how contended the machine was: other `cfnode join` processes before each swarm (`pgrep -fa "cfnode join"`) and
  the cores busy with anything but this benchmark during the window (/proc/stat, steal included).

Compute vs communication. None of cfnode's metrics times the forward/backward passes (the `throughput` field
of each node's DHT record is a smoothed rate and not easily read from outside), and "K=1 step time minus hop
RPC time" is wrong for a pipeline: hops overlap other microbatches' compute, and on 2 cores the stages wait for
each other's CPU, not for the network. So this benchmark measures compute twice, directly:

1. calibration (in this process, before the swarms): `build_stage` for every stage and the same `StageWorker`
   calls a node makes (embed, forward 1..L, head_backward, backward L..1, embed_backward, prepare, apply; and for
   a group member `gradient_vector` + `prepare_averaged` instead of `prepare`), with `torch.set_num_threads(1)`
   like a node, timed per call as thread CPU time (medians over `--calibration-steps` steps; wall times are kept
   in the JSON too). That is what each call costs on a core of its own, even while other jobs load the machine;
2. in the swarms: each node's compute-thread CPU seconds per step (above), to compare with (1) summed over a
   node's calls (more: cache/SMT contention on the shared cores; less: a node keeps one stage hot in cache).

Communication is everything else: hop latency, commit RPCs, averaging time, and the main-thread and child CPU.

Projection (a model, not a measurement): every node of the swarm (stage 0 and each group member) on its own
core, links like this loopback. A small discrete-event simulation of cfnode's schedule, per step: stage 0 launches
microbatch k when microbatch k-F has completed (`launch_order`, F = `--max-in-flight`) and pins its path with the
balancer's rule (fewest queued microbatches, ties to the first member); every node runs one compute call at a time
in arrival order, with the calibrated durations; every hop takes the measured mean hop latency of the K=1 swarm.
When all M microbatches are back: prepare phase = max(stage 0's prepare, r + the slowest member's prepare), where a
group member's prepare is the measured mean averaging time of the K=2 swarm + `prepare_averaged`; then stage 0's
apply + r + the slowest apply; r = the K=1 swarm's mean commit RPC latency minus the calibrated server work (what a
commit RPC costs besides the work it asks for); plus the measured gap between stage 0's attempts. The averaging
time used is the one measured here (on cores the members share with everything else: an upper bound for
loopback); `break_even_averaging_s` says how long the all-reduce may take at most for K=2 to be faster than K=1.
Also printed: the serial formula the issue suggests, compute0 + sum(compute_i)/K + hops*c + commit + averaging, with
no overlap between microbatches (an upper bound for K=1; it assumes the K members split every stage's work
perfectly and work at once). Also simulated: round-robin paths instead of the balancer, every microbatch in flight
(F = M), and a sweep over M = 1, 2, 4, 8 x the run's M (per-call costs unchanged, the commit not growing with M).
On real machines: pass --hop-ms (the real link's latency + B x T x d x 4 bytes over its bandwidth) and
--averaging-ms (16 (K-1) N bytes over the link + hivemind's matchmaking) with --from-json.

Output: a table on stdout, logging on stderr, JSON in `--out` (default `bench/results-groups-<preset>-L<stages>.json`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from typing import Any

import hivemind
import psutil
import torch
from machine import system_busy_s, wait_until_quiet  # bench/machine.py
from prometheus_client.parser import text_string_to_metric_families
from revision import git_revision  # bench/revision.py (bench/ is on sys.path when a script runs)

from cfnode.config import ModelConfig, TrainConfig, preset
from cfnode.localswarm import JOIN_LINE, Proc, Swarm, read_events, wait_for_line
from cfnode.model.data import TokenData, batch_for_step, load_corpus
from cfnode.model.stages import build_stage
from cfnode.model.tokenizer import load_tokenizer
from cfnode.train.schedule import AttemptKey, launch_order, tokens_per_step
from cfnode.train.worker import StageWorker

log = logging.getLogger("bench.groups")
DATA_SEED = 0  # `cfnode join --seed` default
Snapshot = dict[str, Any]
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ------------------------------------------------------------------------------------------------ helpers


def cfnode_join_processes() -> list[str]:
    """`pgrep -fa "cfnode join"`: other agents' swarms on this shared machine (before ours start)."""
    out = subprocess.run(["pgrep", "-fa", "cfnode join"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (q in 0..100)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def scrape(port: int) -> Metrics:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def msum(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= set(lab))


def cpu_of(pid: int) -> dict[str, Any]:
    """CPU seconds of a node: per thread of its main process (tid -> s; the main thread's tid is the pid) and per
    child process (DHT, p2pd, averager)."""
    out: dict[str, Any] = {"threads": {}, "children": {}}
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        out["threads"] = {t.id: t.user_time + t.system_time for t in proc.threads()}
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out["children"][child.pid] = (child.name(), sum(child.cpu_times()[:2]), child.create_time())
    return out


def load_train_tokens() -> torch.Tensor:
    return TokenData.from_corpus(load_corpus(None), load_tokenizer()).train


# ------------------------------------------------------------------------------------------- calibration


def calibrate(cfg: ModelConfig, train: TrainConfig, tokens: torch.Tensor, steps: int, warmup: int = 2
              ) -> dict[str, Any]:
    """Median seconds of every compute call a node makes, per stage, on one thread in this process."""
    torch.set_num_threads(1)
    workers = [StageWorker(build_stage(cfg, i), stage_idx=i, lr=train.lr, clip_norm=train.clip_norm)
               for i in range(cfg.num_stages + 1)]
    head, blocks = workers[0], workers[1:]
    num_mb = train.num_microbatches
    samples: dict[str, list[float]] = {}

    cpu_samples: dict[str, list[float]] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        started, cpu_started = time.perf_counter(), time.thread_time()
        result = fn(*args)
        if record:
            samples.setdefault(name, []).append(time.perf_counter() - started)
            cpu_samples.setdefault(name, []).append(time.thread_time() - cpu_started)
        return result

    busy_start = cpu_start = wall_start = 0.0

    for step in range(warmup + steps):
        record = step >= warmup
        if step == warmup:
            busy_start, cpu_start, wall_start = system_busy_s(), time.process_time(), time.monotonic()
        key = AttemptKey(step, 1)
        batch = batch_for_step(tokens, seed=DATA_SEED, step=step, num_microbatches=num_mb,
                               microbatch_size=train.microbatch_size, seq_len=cfg.seq_len)
        for w in workers:
            w.begin(key)
        for mb in range(num_mb):
            hidden = timed("embed", head.embed, key, mb, batch[mb, :, :-1])
            for i, w in enumerate(blocks, 1):
                hidden = timed(f"forward{i}", w.forward, key, mb, hidden)
            _, grad = timed("head_backward", head.head_backward, key, mb, hidden, batch[mb, :, 1:], num_mb)
            for i in range(cfg.num_stages, 0, -1):
                grad = timed(f"backward{i}", blocks[i - 1].backward, key, mb, grad)
            timed("embed_backward", head.embed_backward, key, mb, grad)
        timed("prepare0", head.prepare, key, num_mb)
        for i, w in enumerate(blocks, 1):
            # what a group member does instead of `prepare` (same cost whatever the values): time both
            vector = timed(f"gradient_vector{i}", w.gradient_vector, key, num_mb)
            timed(f"prepare{i}", w.prepare, key, num_mb)
            w.prepared = None
            timed(f"prepare_averaged{i}", w.prepare_averaged, key, vector * num_mb)
        timed("apply0", head.apply, key)
        for i, w in enumerate(blocks, 1):
            timed(f"apply{i}", w.apply, key)
    window = time.monotonic() - wall_start
    other = max(0.0, (system_busy_s() - busy_start - (time.process_time() - cpu_start)) / window)
    wall_ops = {k: statistics.median(v) for k, v in samples.items()}
    # thread CPU time: what the call costs on a core of its own, even while other jobs compete for the cores
    ops = {k: statistics.median(v) for k, v in cpu_samples.items()}
    L = cfg.num_stages
    per_step = {"stage0": num_mb * (ops["embed"] + ops["head_backward"] + ops["embed_backward"])
                + ops["prepare0"] + ops["apply0"]}
    for i in range(1, L + 1):
        per_step[f"stage{i}"] = num_mb * (ops[f"forward{i}"] + ops[f"backward{i}"]) + ops[f"prepare{i}"] \
            + ops[f"apply{i}"]
    return {"ops_s": {k: round(v, 6) for k, v in ops.items()},
            "ops_wall_s": {k: round(v, 6) for k, v in wall_ops.items()},
            "compute_per_step_s": {k: round(v, 6) for k, v in per_step.items()},
            "other_load_cores": round(other, 2),
            "parameters": {f"stage{i}": w.num_parameters for i, w in enumerate(workers)},
            "steps": steps, "threads": 1}


# ------------------------------------------------------------------------------------------------- swarm


class GroupSwarm:
    """bootstrap + founders of 1..L + (K-1) newcomers per stage + stage 0 (last), all with --replicas K."""

    def __init__(self, cfg: ModelConfig, train: TrainConfig, replicas: int, workdir: str) -> None:
        self.cfg, self.train, self.replicas, self.workdir = cfg, train, replicas, workdir
        self.swarm = Swarm(workdir)
        self.nodes: dict[str, Proc] = {}  # name -> process; names: s0, s1a, s1b, ...
        self.ports: dict[str, int] = {}

    def ready_path(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.ready.json")

    def start(self, timeout_s: float) -> None:
        boot = self.swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                              "--identity-path", os.path.join(self.workdir, "bootstrap.id")])
        peer = wait_for_line(boot, JOIN_LINE, 60).group(1)
        t = self.train
        common = ["--peers", peer, "--preset", self.cfg.preset, "--stages", str(self.cfg.num_stages),
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", f"bench-groups-k{self.replicas}",
                  "--threads", "1", "--replicas", str(self.replicas),
                  "--microbatches", str(t.num_microbatches), "--microbatch-size", str(t.microbatch_size),
                  "--max-in-flight", str(t.max_in_flight), "--lr", str(t.lr), "--seed", str(DATA_SEED),
                  "--val-every", "0", "--metrics-port", "0"]

        def spawn(name: str, stage: int, *extra: str) -> Proc:
            proc = self.swarm.spawn(name, ["join", *common, "--stage", str(stage), "--ready-file",
                                           self.ready_path(name), *extra], events=True)
            self.nodes[name] = proc
            return proc

        letters = "abcdefghijklmnop"
        founders = [f"s{i}a" for i in range(1, self.cfg.num_stages + 1)]
        for i, name in enumerate(founders, 1):
            spawn(name, i)
        self.wait_ready(founders, timeout_s)
        for m in range(1, self.replicas):
            for i in range(1, self.cfg.num_stages + 1):
                spawn(f"s{i}{letters[m]}", i)
        # stage 0 runs "forever"; we stop the swarm once the window is measured
        spawn("s0", 0, "--max-steps", "100000")
        self.wait_ready(list(self.nodes), timeout_s)

    def wait_ready(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for name in names:
            while name not in self.ports:
                self.check_alive()
                path = self.ready_path(name)
                if os.path.exists(path):
                    with contextlib.suppress(ValueError, OSError), open(path, encoding="utf-8") as f:
                        self.ports[name] = int(json.load(f)["metrics_port"])
                        continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout_s:.0f}s; see {self.nodes[name].log_path}")
                time.sleep(0.1)

    def check_alive(self) -> None:
        for proc in self.swarm.procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")

    def newcomers(self) -> list[str]:
        return [n for n in self.nodes if n != "s0" and not n.endswith("a")]

    def snapshot(self) -> Snapshot:
        """Stage 0's metrics first (its committed-step counter dates the snapshot), then every other node's."""
        snap: Snapshot = {"t": time.monotonic(), "busy": system_busy_s(), "bench_cpu": time.process_time(),
                          "metrics": {}, "cpu": {}}
        for name in ["s0", *[n for n in self.nodes if n != "s0"]]:
            # a node's CPU right after its counters: both go with the committed-step counter of that scrape
            snap["metrics"][name] = scrape(self.ports[name])
            snap["cpu"][name] = cpu_of(self.nodes[name].popen.pid)
        for proc in self.swarm.procs:
            if proc.name not in snap["cpu"]:
                snap["cpu"][proc.name] = cpu_of(proc.popen.pid)
        snap["pids"] = {proc.name: proc.popen.pid for proc in self.swarm.procs}
        snap["ready_at"] = {name: os.path.getmtime(self.ready_path(name)) for name in self.nodes}
        snap["step"] = int(msum(snap["metrics"]["s0"], "cfnode_steps_committed_total"))
        return snap

    def leftovers(self) -> list[str]:
        """Processes of our process groups still alive after stop (DHT children and p2pd included)."""
        pgids = {p.popen.pid for p in self.swarm.procs}
        out = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        return out


def run_swarm(cfg: ModelConfig, train: TrainConfig, replicas: int, warmup: int, steps: int, workdir: str,
              timeout_s: float) -> dict[str, Any]:
    foreign = cfnode_join_processes()
    load_before = os.getloadavg()
    log.info("K=%d: %d other 'cfnode join' processes running, load average %.2f %.2f %.2f", replicas, len(foreign),
             *load_before)
    gs = GroupSwarm(cfg, train, replicas, workdir)
    started = time.monotonic()
    deadline = started + timeout_s
    start = end = None
    first_step_at: float | None = None
    try:
        gs.start(timeout_s)
        log.info("K=%d: %d nodes ready after %.1fs", replicas, len(gs.nodes), time.monotonic() - started)
        head = gs.nodes["s0"]
        reported = 0
        while end is None:
            gs.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"K={replicas}: no complete window within {timeout_s:.0f}s; logs in {workdir}")
            steps_seen = [e for e in read_events(head.events_path) if e["event"] == "step"]
            last = steps_seen[-1]["step"] if steps_seen else 0
            if steps_seen and first_step_at is None:
                first_step_at = time.monotonic()
                log.info("K=%d: first step after %.1fs of start-up", replicas, first_step_at - started)
            if last >= reported + 10:
                reported = last // 10 * 10
                log.info("K=%d: step %d, loss %.4f, %.0f tokens/s", replicas, last, steps_seen[-1]["loss"],
                         steps_seen[-1]["tokens_per_s"])
            if start is None:
                joins = {n: [e for e in read_events(gs.nodes[n].events_path) if e["event"] == "joined_group"]
                         for n in gs.newcomers()}
                if all(joins.values()):
                    joined_at = max((j[0]["step"] for j in joins.values()), default=0)
                    if last >= max(warmup, joined_at + 2):
                        start = gs.snapshot()
                        start["joined_at"] = {n: j[0]["step"] for n, j in joins.items()}
                        log.info("K=%d: window starts at step %d (newcomers joined at %s)", replicas, start["step"],
                                 start["joined_at"] or "-")
            elif last >= start["step"] + steps:
                end = gs.snapshot()
                log.info("K=%d: window ends at step %d", replicas, end["step"])
            time.sleep(0.05)
        events = {name: read_events(proc.events_path) for name, proc in gs.nodes.items()}
    finally:
        gs.swarm.stop()
        left = gs.leftovers()
        if left:
            log.error("K=%d: processes left after stop: %s", replicas, left)
    result = summarize(cfg, train, replicas, start, end, events)
    result.update({"other_cfnode_join_processes": len(foreign), "load_average_before": load_before,
                   "startup_s": round((first_step_at or started) - started, 1),
                   "wall_s": round(time.monotonic() - started, 1), "leftover_processes": left})
    return result


def summarize(cfg: ModelConfig, train: TrainConfig, replicas: int, start: Snapshot, end: Snapshot,
              events: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    n = end["step"] - start["step"]
    tokens = tokens_per_step(train.num_microbatches, train.microbatch_size, cfg.seq_len)
    by_step = {e["step"]: e for e in events["s0"] if e["event"] == "step"}
    window = list(range(start["step"] + 1, end["step"] + 1))
    missing = [s for s in [start["step"], *window] if s not in by_step]
    if missing:
        raise RuntimeError(f"K={replicas}: stage 0 logged no step event for steps {missing}")
    intervals = [by_step[s]["time"] - by_step[s - 1]["time"] for s in window]
    attempt_s = [by_step[s]["step_s"] for s in window]
    elapsed = by_step[window[-1]]["time"] - by_step[start["step"]]["time"]
    aborted = [e for e in events["s0"] if e["event"] == "step_aborted" and start["step"] <= e["step"] < end["step"]]
    out: dict[str, Any] = {
        "replicas": replicas, "window_steps": n, "window": [start["step"], end["step"]],
        "newcomers_joined_at_step": start.get("joined_at", {}),
        "step_s": {"median": statistics.median(intervals), "p90": percentile(intervals, 90),
                   "mean": elapsed / n, "min": min(intervals), "max": max(intervals)},
        "attempt_s_median": statistics.median(attempt_s),
        "between_attempts_s_median": statistics.median(i - a for i, a in zip(intervals, attempt_s, strict=True)),
        "tokens_per_s": {"median_step": tokens / statistics.median(intervals), "window": tokens * n / elapsed},
        "tokens_per_step": tokens,
        "losses": [by_step[s]["loss"] for s in sorted(by_step)],
        "steps_aborted_in_window": [{k: e.get(k) for k in ("step", "attempt", "reason")} for e in aborted],
    }
    # --- counters, per committed step
    def delta(name: str, metric: str, **labels: str) -> float:
        return msum(end["metrics"][name], metric, **labels) - msum(start["metrics"][name], metric, **labels)

    nodes = list(end["metrics"])
    # Per node, counters are divided by the steps that node committed between its own two scrapes: scraping all
    # nodes takes about as long as a tiny step, so stage 0's counter would be off by a step for the others.
    node_steps = {name: delta(name, "cfnode_steps_committed_total") or n for name in nodes}
    out["node_steps_in_window"] = node_steps
    sent: dict[str, float] = {}
    for name in nodes:
        for (metric, lab), _ in end["metrics"][name].items():
            if metric == "cfnode_transfer_bytes_total" and dict(lab).get("direction") == "sent":
                kind = dict(lab)["kind"]
                sent[kind] = sent.get(kind, 0.0) + delta(name, metric, direction="sent", kind=kind) / node_steps[name]
    out["bytes_sent_per_step"] = {k: round(v) for k, v in sent.items() if v}
    out["bytes_sent_per_step_total"] = round(sum(sent.values()))
    rpc: dict[str, dict[str, float]] = {}
    for method in ("forward", "backward", "commit", "admit", "info"):
        for side in ("client", "server"):
            s = sum(delta(nm, "cfnode_rpc_duration_seconds_sum", method=method, side=side) for nm in nodes)
            c = sum(delta(nm, "cfnode_rpc_duration_seconds_count", method=method, side=side) for nm in nodes)
            s_step = sum(delta(nm, "cfnode_rpc_duration_seconds_sum", method=method, side=side) / node_steps[nm]
                         for nm in nodes)
            c_step = sum(delta(nm, "cfnode_rpc_duration_seconds_count", method=method, side=side) / node_steps[nm]
                         for nm in nodes)
            if c:
                rpc[f"{method}/{side}"] = {"calls_per_step": c_step, "mean_s": s / c, "sum_per_step_s": s_step}
    out["rpc"] = rpc
    hop_s = sum(rpc.get(f"{m}/client", {}).get("sum_per_step_s", 0.0) for m in ("forward", "backward"))
    hop_c = sum(rpc.get(f"{m}/client", {}).get("calls_per_step", 0.0) for m in ("forward", "backward"))
    out["hop_mean_s"] = hop_s / hop_c if hop_c else None
    out["hops_per_step"] = hop_c
    averaging = {}
    for name in nodes:
        c = delta(name, "cfnode_group_averaging_duration_seconds_count")
        if c:
            s = delta(name, "cfnode_group_averaging_duration_seconds_sum")
            averaging[name] = {"prepares_per_step": c / node_steps[name], "mean_s": s / c}
    out["averaging"] = averaging
    if averaging:
        out["averaging_mean_s"] = statistics.mean(v["mean_s"] for v in averaging.values())
        out["averaging_max_member_mean_s"] = max(v["mean_s"] for v in averaging.values())
        # per stage: the members average at once; the step waits for the slowest group
        per_stage: dict[int, list[float]] = {}
        for name, v in averaging.items():
            per_stage.setdefault(int(name[1:-1]), []).append(v["mean_s"])
        out["averaging_per_stage_mean_s"] = {f"stage{i}": statistics.mean(v) for i, v in sorted(per_stage.items())}
    out["microbatches_per_step"] = {
        name: {d: delta(name, "cfnode_microbatches_processed_total", direction=d) / node_steps[name]
               for d in ("forward", "backward")}
        for name in nodes if name != "s0"}
    # --- CPU per step, per node, by thread role
    window_s = end["t"] - start["t"]
    cpu: dict[str, dict[str, float]] = {}
    ours = 0.0
    for name in end["cpu"]:
        a, b = start["cpu"].get(name, {"threads": {}, "children": {}}), end["cpu"][name]
        steps_of = node_steps.get(name, n)  # the bootstrap has no counters: stage 0's steps
        threads = {tid: b["threads"][tid] - a["threads"].get(tid, 0.0) for tid in b["threads"]}
        main = threads.pop(end["pids"][name], 0.0)  # the main thread's tid is the process id
        compute = max(threads.values(), default=0.0)
        other = sum(threads.values()) - compute
        kids = {"p2pd": 0.0, "dht": 0.0, "averager": 0.0}
        ready_at = end["ready_at"].get(name, math.inf)
        for p, (pname, seconds, created) in b["children"].items():
            # p2pd by name; of the python children, the DHT process starts before the node is ready, hivemind's
            # averager process at the first prepare of a group member (after it)
            role = "p2pd" if "p2pd" in pname else ("averager" if created > ready_at else "dht")
            kids[role] += seconds - a["children"].get(p, ("", 0.0, 0.0))[1]
        children = sum(kids.values())
        cpu[name] = {"compute_s": compute / steps_of, "main_thread_s": main / steps_of,
                     "other_threads_s": other / steps_of, "children_s": children / steps_of,
                     **{f"{k}_s": v / steps_of for k, v in kids.items()}}
        ours += compute + main + other + children
    ours += end["bench_cpu"] - start["bench_cpu"]
    out["cpu_per_step_s"] = {k: {kk: round(vv, 5) for kk, vv in v.items()} for k, v in cpu.items()}
    out["cores_busy_ours"] = ours / window_s
    out["cores_busy_machine"] = (end["busy"] - start["busy"]) / window_s
    out["cores_busy_other"] = max(0.0, out["cores_busy_machine"] - out["cores_busy_ours"])
    out["window_wall_s"] = window_s
    return out


# ------------------------------------------------------------------------------------------------ projection


def simulate(L: int, M: int, F: int, K: int, ops: dict[str, float], hop_s: float, rpc_s: float,
             averaging_s: float, gap_s: float, round_robin: bool = False) -> dict[str, float]:
    """One step of cfnode's schedule with every node on its own core (see the module docstring). `round_robin`:
    microbatch k takes member k mod K of every group instead of the balancer's choice (for comparison)."""
    route = [(0, "embed"), *[(i, f"forward{i}") for i in range(1, L + 1)], (0, "head_backward"),
             *[(i, f"backward{i}") for i in range(L, 0, -1)], (0, "embed_backward")]
    queued: dict[tuple[int, int], int] = {}
    paths: dict[int, dict[int, tuple[int, int]]] = {}
    busy_until: dict[Any, float] = {}
    queue: dict[Any, list[tuple[int, int]]] = {}
    busy_s: dict[Any, float] = {}
    heap: list[tuple[float, int, str, Any, int, int]] = []
    counter = [0]
    dependents = {after: mb for mb, after in launch_order(M, F) if after is not None}
    completed = [0]
    last_done = [0.0]

    def node_of(mb: int, pos: int) -> Any:
        stage = route[pos][0]
        return 0 if stage == 0 else paths[mb][stage]

    def push(t: float, kind: str, node: Any, mb: int, pos: int) -> None:
        counter[0] += 1
        heapq.heappush(heap, (t, counter[0], kind, node, mb, pos))

    def launch(mb: int, t: float) -> None:
        paths[mb] = {}
        for i in range(1, L + 1):
            m = mb % K if round_robin else min(range(K), key=lambda m: (queued.get((i, m), 0), m))
            queued[(i, m)] = queued.get((i, m), 0) + 1
            paths[mb][i] = (i, m)
        push(t, "arrive", 0, mb, 0)

    def start_next(node: Any, t: float) -> None:
        if busy_until.get(node, -1.0) > t or not queue.get(node):
            return
        mb, pos = queue[node].pop(0)
        dur = ops[route[pos][1]]
        busy_until[node] = t + dur
        busy_s[node] = busy_s.get(node, 0.0) + dur
        push(t + dur, "finish", node, mb, pos)

    for mb, after in launch_order(M, F):
        if after is None:
            launch(mb, 0.0)
    while heap:
        t, _, kind, node, mb, pos = heapq.heappop(heap)
        if kind == "arrive":
            queue.setdefault(node, []).append((mb, pos))
            start_next(node, t)
            continue
        busy_until[node] = t
        if pos == len(route) - 1:
            for stage, member in paths[mb].items():
                queued[(stage, member[1])] -= 1
            completed[0] += 1
            last_done[0] = t
            if mb in dependents:
                launch(dependents[mb], t)
        else:
            push(t + hop_s, "arrive", node_of(mb, pos + 1), mb, pos + 1)
        start_next(node, t)
    assert completed[0] == M
    member_prepare = [rpc_s + (ops[f"prepare{i}"] if K == 1 else averaging_s + ops[f"prepare_averaged{i}"])
                      for i in range(1, L + 1)]
    prepare = max(ops["prepare0"], *member_prepare)
    apply = ops["apply0"] + rpc_s + max(ops[f"apply{i}"] for i in range(1, L + 1))
    total = last_done[0] + prepare + apply + gap_s
    return {"step_s": total, "microbatches_s": last_done[0], "prepare_s": prepare, "apply_s": apply, "gap_s": gap_s,
            "stage0_busy_s": busy_s.get(0, 0.0),
            "busiest_member_busy_s": max((v for k, v in busy_s.items() if k != 0), default=0.0)}


def serial_formula(L: int, M: int, K: int, ops: dict[str, float], hop_s: float, rpc_s: float, averaging_s: float,
                   gap_s: float) -> dict[str, float]:
    """compute0 + sum(compute_i)/K + hops x hop latency + commit (+ averaging): no overlap between microbatches."""
    c0 = M * (ops["embed"] + ops["head_backward"] + ops["embed_backward"])
    ct = sum(M * (ops[f"forward{i}"] + ops[f"backward{i}"]) for i in range(1, L + 1))
    hops = 2 * (L + 1) * M * hop_s
    prepare = max(ops["prepare0"], *[rpc_s + (ops[f"prepare{i}"] if K == 1 else averaging_s
                                              + ops[f"prepare_averaged{i}"]) for i in range(1, L + 1)])
    apply = ops["apply0"] + rpc_s + max(ops[f"apply{i}"] for i in range(1, L + 1))
    return {"step_s": c0 + ct / K + hops + prepare + apply + gap_s, "compute0_s": c0, "compute_stages_s": ct / K,
            "hops_s": hops, "commit_s": prepare + apply, "gap_s": gap_s}


def project(cfg: ModelConfig, train: TrainConfig, calib: dict[str, Any], k1: dict[str, Any], kn: dict[str, Any],
            hop_s: float | None = None, averaging_s: float | None = None) -> dict[str, Any]:
    """The projection from the measured runs; `hop_s` / `averaging_s` replace the measured values (another link)."""
    ops, L, M, F, K = calib["ops_s"], cfg.num_stages, train.num_microbatches, train.max_in_flight, kn["replicas"]
    measured_hop_s, measured_averaging_s = k1["hop_mean_s"], max(kn["averaging_per_stage_mean_s"].values())
    hop_s = measured_hop_s if hop_s is None else hop_s
    averaging_s = measured_averaging_s if averaging_s is None else averaging_s
    server_work = statistics.mean((ops[f"prepare{i}"] + ops[f"apply{i}"]) / 2 for i in range(1, L + 1))
    rpc_s = max(0.0, k1["rpc"]["commit/client"]["mean_s"] - server_work)
    args1 = (ops, hop_s, rpc_s, 0.0, k1["between_attempts_s_median"])
    argsk = (ops, hop_s, rpc_s, averaging_s, kn["between_attempts_s_median"])
    sim1, simk = simulate(L, M, F, 1, *args1), simulate(L, M, F, K, *argsk)
    simk_rr = simulate(L, M, F, K, *argsk, round_robin=True)
    # what-if: every microbatch in flight at once (--max-in-flight M), where a group's members can work in parallel
    all_in_flight = {"k1": simulate(L, M, M, 1, *args1), f"k{K}": simulate(L, M, M, K, *argsk),
                     f"k{K}_free_averaging": simulate(L, M, M, K, ops, hop_s, rpc_s, 0.0, argsk[-1])}
    # what-if: more microbatches per step (same microbatch size: per-call costs unchanged; the averaging and commit
    # costs per step do not grow with M); F = the run's window, and F = M
    sweep = []
    for m in sorted({M, 2 * M, 4 * M, 8 * M}):
        for f in sorted({min(F, m), m}):
            t1 = simulate(L, m, f, 1, *args1)["step_s"]
            tk = simulate(L, m, f, K, *argsk)["step_s"]
            t0 = simulate(L, m, f, K, ops, hop_s, rpc_s, 0.0, argsk[-1])["step_s"]
            sweep.append({"microbatches": m, "max_in_flight": f, "k1_step_s": t1, f"k{K}_step_s": tk,
                          f"k{K}_free_averaging_step_s": t0, "speedup": t1 / tk, "speedup_free_averaging": t1 / t0})
    ser1, serk = serial_formula(L, M, 1, *args1), serial_formula(L, M, K, *argsk)

    def t_k(a: float) -> float:
        return simulate(L, M, F, K, ops, hop_s, rpc_s, a, kn["between_attempts_s_median"])["step_s"]

    break_even: float | None
    if t_k(0.0) >= sim1["step_s"]:
        break_even = None  # K members cannot win even with a free all-reduce
    else:
        lo, hi = 0.0, 1.0
        while t_k(hi) < sim1["step_s"]:
            hi *= 2
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if t_k(mid) < sim1["step_s"] else (lo, mid)
        break_even = lo
    return {"assumptions": {"hop_s": hop_s, "commit_rpc_overhead_s": rpc_s, "averaging_s": averaging_s,
                            "hop_s_measured": hop_s == measured_hop_s,
                            "averaging_s_measured": averaging_s == measured_averaging_s,
                            "gap_s_k1": k1["between_attempts_s_median"], "gap_s_k": kn["between_attempts_s_median"],
                            "one_core_per_node": True, "compute": "calibrated, 1 thread"},
            "simulated": {"k1": sim1, f"k{K}": simk, "speedup": sim1["step_s"] / simk["step_s"],
                          f"k{K}_free_averaging_step_s": t_k(0.0), f"k{K}_round_robin": simk_rr,
                          "max_in_flight_m": all_in_flight, "sweep": sweep},
            "serial_formula": {"k1": ser1, f"k{K}": serk, "speedup": ser1["step_s"] / serk["step_s"]},
            "break_even_averaging_s": break_even}


# ------------------------------------------------------------------------------------------------- report


def averaging_bytes_est(calib: dict[str, Any], L: int, K: int, prepares_per_step: float = 1.0) -> int:
    """Bytes hivemind's butterfly all-reduce sends per step: 16 (K-1) N per group of a stage with N parameters."""
    return int(sum(16 * (K - 1) * calib["parameters"][f"stage{i}"] for i in range(1, L + 1)) * prepares_per_step)


def fmt_bytes(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def print_table(cfg: ModelConfig, calib: dict[str, Any], runs: list[dict[str, Any]], proj: dict[str, Any] | None
                ) -> None:
    L = cfg.num_stages
    cols = [f"K={r['replicas']}" for r in runs]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, f: Any) -> None:
        vals = []
        for r in runs:
            try:
                vals.append(f(r))
            except (KeyError, TypeError, ValueError):
                vals.append("-")
        rows.append((label, vals))

    row("nodes (stage 0 + members)", lambda r: str(1 + L * r["replicas"]))
    row("other 'cfnode join' procs / load1", lambda r: f"{r['other_cfnode_join_processes']} / "
        f"{r['load_average_before'][0]:.2f}")
    row("cores busy: ours / others", lambda r: f"{r['cores_busy_ours']:.2f} / {r['cores_busy_other']:.2f}")
    row("steps timed (window)", lambda r: f"{r['window_steps']} ({r['window'][0]}..{r['window'][1]})")
    row("step s: median", lambda r: f"{r['step_s']['median']:.4f}")
    row("step s: p90", lambda r: f"{r['step_s']['p90']:.4f}")
    row("step s: mean", lambda r: f"{r['step_s']['mean']:.4f}")
    row("tokens/s (median step)", lambda r: f"{r['tokens_per_s']['median_step']:.0f}")
    row("steps aborted in window", lambda r: str(len(r["steps_aborted_in_window"])))
    for kind in ("activations", "gradients", "weights", "replica"):
        row(f"bytes sent/step: {kind}", lambda r, k=kind: fmt_bytes(r["bytes_sent_per_step"].get(k, 0)))
    row("bytes/step: all-reduce (est.)", lambda r: fmt_bytes(averaging_bytes_est(calib, L, r["replicas"])))
    row("averaging s/prepare: mean (max member)", lambda r: f"{r['averaging_mean_s']:.4f} "
        f"({r['averaging_max_member_mean_s']:.4f})" if r["averaging"] else "-")
    row("hops/step x mean hop s", lambda r: f"{r['hops_per_step']:.0f} x {r['hop_mean_s']:.4f}")
    row("hop client s/step (sum)", lambda r: f"{sum(r['rpc'][m + '/client']['sum_per_step_s'] for m in ('forward', 'backward')):.4f}")
    row("commit RPC: calls/step x mean s", lambda r: f"{r['rpc']['commit/client']['calls_per_step']:.0f} x "
        f"{r['rpc']['commit/client']['mean_s']:.4f}")
    row("CPU s/step: compute threads", lambda r: f"{sum(v['compute_s'] for k, v in r['cpu_per_step_s'].items() if k != 'bootstrap'):.4f}")
    row("CPU s/step: main threads (asyncio)", lambda r: f"{sum(v['main_thread_s'] for k, v in r['cpu_per_step_s'].items() if k != 'bootstrap'):.4f}")
    def cpu_sum(r: dict[str, Any], key: str) -> str:
        return f"{sum(v[key] for k, v in r['cpu_per_step_s'].items() if k != 'bootstrap'):.4f}"

    row("CPU s/step: other threads", lambda r: cpu_sum(r, "other_threads_s"))
    row("CPU s/step: DHT processes", lambda r: cpu_sum(r, "dht_s"))
    row("CPU s/step: p2pd", lambda r: cpu_sum(r, "p2pd_s"))
    row("CPU s/step: averager processes", lambda r: cpu_sum(r, "averager_s"))
    row("CPU s/step: bootstrap", lambda r: f"{sum(r['cpu_per_step_s'].get('bootstrap', {}).values()):.4f}")
    for i in range(1, L + 1):
        row(f"microbatches/step: stage {i} members", lambda r, i=i: " + ".join(
            f"{v['forward']:.2f}" for k, v in sorted(r["microbatches_per_step"].items()) if k[:-1] == f"s{i}"))
    row("compute CPU s/step: stage 0", lambda r: f"{r['cpu_per_step_s']['s0']['compute_s']:.4f}")
    for i in range(1, L + 1):
        row(f"compute CPU s/step: stage {i} members", lambda r, i=i: " + ".join(
            f"{v['compute_s']:.4f}" for k, v in sorted(r["cpu_per_step_s"].items()) if k[:-1] == f"s{i}"))
    width = max(len(label) for label, _ in rows) + 2
    colw = max(12, *(len(v) for _, vals in rows for v in vals)) + 2
    print()
    print(f"stage groups, preset {cfg.preset}, L={L}: measured on this machine ({os.cpu_count()} CPUs)")
    print(f"{'':<{width}}" + "".join(f"{c:>{colw}}" for c in cols))
    for label, vals in rows:
        print(f"{label:<{width}}" + "".join(f"{v:>{colw}}" for v in vals))
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        print(f"K={b['replicas']} vs K={a['replicas']} on this machine: median step x"
              f"{b['step_s']['median'] / a['step_s']['median']:.2f}, p90 x{b['step_s']['p90'] / a['step_s']['p90']:.2f}, "
              f"bytes sent x{b['bytes_sent_per_step_total'] / max(1, a['bytes_sent_per_step_total']):.2f} (metered), "
              f"loss max |diff| {b.get('loss_max_abs_diff_vs_k1')}")
        extra = b["step_s"]["median"] - a["step_s"]["median"]
        avg = max(b.get("averaging_per_stage_mean_s", {"": 0.0}).values())
        print(f"  extra per step {extra:.4f} s = averaging (slowest group's mean per prepare) {avg:.4f} s + the rest "
              f"{extra - avg:.4f} s (more processes on the same cores: compute, hops and commit RPCs waiting for CPU)")
    print()
    print(f"calibrated compute per step (1 thread, in-process, thread CPU s; {calib['other_load_cores']} cores of "
          "other load meanwhile): " + ", ".join(
        f"{k} {v:.4f}" for k, v in calib["compute_per_step_s"].items()))
    ops = calib["ops_s"]
    print("  per call: " + ", ".join(f"{k} {v * 1000:.2f}ms" for k, v in ops.items()))
    if proj:
        a = proj["assumptions"]
        K = runs[-1]["replicas"]
        sim, ser = proj["simulated"], proj["serial_formula"]
        print()
        print(f"projection, one core per node (hop {a['hop_s'] * 1000:.2f} ms"
              f"{' as measured' if a.get('hop_s_measured', True) else ' given'}, commit RPC overhead "
              f"{a['commit_rpc_overhead_s'] * 1000:.2f} ms, averaging {a['averaging_s'] * 1000:.1f} ms"
              f"{' as measured' if a.get('averaging_s_measured', True) else ' given'}):")
        for label, d in (("pipeline simulation", sim), ("serial formula", ser)):
            print(f"  {label:<20} K=1 {d['k1']['step_s']:.4f} s   K={K} {d[f'k{K}']['step_s']:.4f} s   "
                  f"speedup x{d['speedup']:.2f}")
        s1, sk = sim["k1"], sim[f"k{K}"]
        print(f"  simulated K=1: microbatches {s1['microbatches_s']:.4f} + prepare {s1['prepare_s']:.4f} + apply "
              f"{s1['apply_s']:.4f} + gap {s1['gap_s']:.4f}; stage 0 busy {s1['stage0_busy_s']:.4f}, busiest member "
              f"{s1['busiest_member_busy_s']:.4f}")
        print(f"  simulated K={K}: microbatches {sk['microbatches_s']:.4f} + prepare {sk['prepare_s']:.4f} + apply "
              f"{sk['apply_s']:.4f} + gap {sk['gap_s']:.4f}; stage 0 busy {sk['stage0_busy_s']:.4f}, busiest member "
              f"{sk['busiest_member_busy_s']:.4f}; with a free all-reduce {sim[f'k{K}_free_averaging_step_s']:.4f}")
        rr = sim[f"k{K}_round_robin"]
        print(f"  simulated K={K} with round-robin paths (k mod K) instead of the balancer: {rr['step_s']:.4f} s, "
              f"busiest member {rr['busiest_member_busy_s']:.4f}")
        fm = sim["max_in_flight_m"]
        print(f"  what-if --max-in-flight M (all in flight): K=1 {fm['k1']['step_s']:.4f} s, "
              f"K={K} {fm[f'k{K}']['step_s']:.4f} s, K={K} with a free all-reduce {fm[f'k{K}_free_averaging']['step_s']:.4f} s")
        print(f"  what-if more microbatches per step (simulated, one core per node): M, F -> K=1 s, K={K} s "
              f"(x speedup), K={K} free all-reduce s (x speedup)")
        for w in sim.get("sweep", []):
            print(f"    M={w['microbatches']:<3} F={w['max_in_flight']:<3} {w['k1_step_s']:8.4f} {w[f'k{K}_step_s']:8.4f} "
                  f"(x{w['speedup']:.2f}) {w[f'k{K}_free_averaging_step_s']:8.4f} (x{w['speedup_free_averaging']:.2f})")
        be = proj["break_even_averaging_s"]
        print("  break-even all-reduce time: " + (f"{be * 1000:.1f} ms (K={K} is faster when averaging takes less)"
                                                  if be is not None else f"none (K={K} is not faster even with a free "
                                                  "all-reduce)"))


def wait_for_ci_lock(path: str = "/tmp/cfnode_ci.lock") -> None:
    waited = 0
    while os.path.exists(path):
        if waited % 300 == 0:
            log.info("%s exists: waiting", path)
        time.sleep(30)
        waited += 30


def reproject(path: str, out: str | None, hop_s: float | None, averaging_s: float | None) -> int:
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    cfg = ModelConfig(**payload["model"])
    t = payload["train"]
    train = TrainConfig(num_microbatches=t["num_microbatches"], microbatch_size=t["microbatch_size"],
                        max_in_flight=t["max_in_flight"], lr=t["lr"], clip_norm=t["clip_norm"], val_every=0)
    runs, calib = payload["runs"], payload["calibration"]
    base = next((r for r in runs if r["replicas"] == 1), None)
    proj = None
    if base is not None and len(runs) >= 2 and runs[-1]["averaging"]:
        proj = project(cfg, train, calib, base, runs[-1], hop_s, averaging_s)
    print_table(cfg, calib, runs, proj)
    if out:
        payload["projection"] = proj
        with open(out, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        log.info("wrote %s", out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stages", type=int, default=2, help="L transformer stages")
    parser.add_argument("--steps", type=int, default=30, help="timed committed steps per swarm")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the window (at least)")
    parser.add_argument("--replicas", default="1,2", help="group sizes K to run, in order; the first is the base")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--max-in-flight", type=int, default=3)
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds allowed per swarm")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before the calibration and each swarm, wait up to this many seconds for a 20 s window "
                             "in which the machine is idle (< 0.3 cores busy)")
    parser.add_argument("--workdir", default=None, help="keep logs here (default: a temp dir, removed on success)")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results-groups-<preset>-L<L>.json)")
    parser.add_argument("--from-json", default=None, metavar="PATH",
                        help="run nothing: reprint PATH's figures and redo its projection (with --hop-ms / "
                             "--averaging-ms: for another link); writes --out only if given")
    parser.add_argument("--hop-ms", type=float, default=None, help="projection: hop latency instead of the measured")
    parser.add_argument("--averaging-ms", type=float, default=None,
                        help="projection: all-reduce time per prepare instead of the measured")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    hop_s = None if args.hop_ms is None else args.hop_ms / 1000
    averaging_s = None if args.averaging_ms is None else args.averaging_ms / 1000
    if args.from_json:
        return reproject(args.from_json, args.out, hop_s, averaging_s)
    # SIGTERM (also when started in the background, where SIGINT is ignored) unwinds through Swarm.stop()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    replicas = [int(k) for k in args.replicas.split(",") if k.strip()]
    if not replicas or replicas[0] != 1 or any(k < 1 for k in replicas) or args.steps < 2 or args.warmup < 1:
        parser.error("--replicas must start with 1; --steps >= 2, --warmup >= 1")
    cfg = preset(args.preset, num_stages=args.stages)
    train = TrainConfig(num_microbatches=args.microbatches, microbatch_size=args.microbatch_size,
                        max_in_flight=args.max_in_flight, val_every=0)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        f"results-groups-{cfg.preset}-L{cfg.num_stages}.json")
    workdir = args.workdir or tempfile.mkdtemp(prefix="cfnode-bench-groups-")
    os.makedirs(workdir, exist_ok=True)
    revision = git_revision()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log.info("preset %s, L=%d x %d layers (d=%d, T=%d), M=%d x B=%d, max in flight %d; K in %s; %d+ warmup, %d timed "
             "steps; %d CPUs; workdir %s", cfg.preset, cfg.num_stages, cfg.layers_per_stage, cfg.hidden_size,
             cfg.seq_len, train.num_microbatches, train.microbatch_size, train.max_in_flight, replicas, args.warmup,
             args.steps, os.cpu_count() or 0, workdir)
    before = cfnode_join_processes()
    log.info("before: %d 'cfnode join' processes on the machine", len(before))
    wait_for_ci_lock()
    tokens = load_train_tokens()
    if args.wait_quiet > 0:
        log.info("waited %.0fs for an idle machine", wait_until_quiet(args.wait_quiet))
    log.info("calibrating compute (%d steps, 1 thread) ...", args.calibration_steps)
    calib = calibrate(cfg, train, tokens, args.calibration_steps)
    log.info("calibrated compute per step: %s", calib["compute_per_step_s"])
    runs: list[dict[str, Any]] = []
    failed = False
    for k in replicas:
        wait_for_ci_lock()
        if args.wait_quiet > 0:
            log.info("waited %.0fs for an idle machine", wait_until_quiet(args.wait_quiet))
        rundir = os.path.join(workdir, f"k{k}")
        os.makedirs(rundir, exist_ok=True)
        try:
            runs.append(run_swarm(cfg, train, k, args.warmup, args.steps, rundir, args.timeout))
        except Exception:  # report what ran
            failed = True
            log.exception("K=%d failed; logs in %s", k, rundir)
    base = next((r for r in runs if r["replicas"] == 1), None)
    for r in runs:
        if base is not None:
            common = min(len(r["losses"]), len(base["losses"]))
            r["loss_max_abs_diff_vs_k1"] = max((abs(a - b) for a, b in zip(r["losses"][:common],
                                                                         base["losses"][:common], strict=True)),
                                               default=None)
        r["averaging_bytes_per_step_est"] = averaging_bytes_est(calib, cfg.num_stages, r["replicas"])
    proj = None
    if base is not None and len(runs) >= 2 and runs[-1]["averaging"]:
        proj = project(cfg, train, calib, base, runs[-1], hop_s, averaging_s)
    print_table(cfg, calib, runs, proj)
    after = cfnode_join_processes()
    payload = {
        "date": started_at,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "hivemind": hivemind.__version__},
        "cfnode_revision": revision,
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "model": asdict(cfg),
        "train": {"num_microbatches": train.num_microbatches, "microbatch_size": train.microbatch_size,
                  "max_in_flight": train.max_in_flight, "lr": train.lr, "clip_norm": train.clip_norm},
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "cfnode_join_processes_before": len(before), "cfnode_join_processes_after": len(after),
        "calibration": calib, "runs": runs, "projection": proj,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    log.info("wrote %s", out_path)
    if args.workdir is None and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        log.info("logs kept in %s", workdir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
