#!/usr/bin/env python
"""Training throughput of one model and one microbatch schedule, three ways, side by side.

(a) single   -- every stage (``build_stage`` for each index) driven by ``StageWorker`` instances in THIS
                process, with the same per-microbatch calls as a swarm node (begin, embed, forward,
                head_backward, backward, embed_backward, commit) and ``torch.set_num_threads(--threads)``.
(b) swarm    -- a real cfnode swarm on 127.0.0.1: ``cfnode bootstrap`` plus L+1 ``cfnode join`` processes
                (``--threads 1`` each); tokens/s from stage 0's step events (``time`` field) after warmup.
(c) pipelining -- ``torch.distributed.pipelining`` (PipelineStage + ScheduleGPipe, gloo over 127.0.0.1),
                one process per pipeline stage, 1 thread each, on the same stage modules. cfnode's ring has
                stage 0 at both ends; a torch pipeline is linear, so it runs [embed] -> blocks 1..L ->
                [norm + lm_head + loss]: L+2 ranks, the embedding and the head on different ranks.

All three use the same seeded weights, the same data (``batch_for_step`` with seed 0) and the same optimizer
semantics (Adam, per-stage clipping at 1.0; in (c) the embedding and head ranks clip jointly, like cfnode's
stage 0), so their per-step losses should agree closely: the table shows the largest difference from (a).

    python bench/throughput.py --preset small --stages 2 --steps 30 --json bench/results-throughput-small-L2.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from machine import system_busy_s, wait_until_quiet  # bench/machine.py
from revision import git_revision  # bench/revision.py (bench/ is on sys.path when a script runs)
from scipy import stats
from torch import nn

from cfnode.config import ModelConfig, TrainConfig, preset
from cfnode.localswarm import JOIN_LINE, Proc, Swarm, read_events, wait_for_line
from cfnode.model.data import TokenData, batch_for_step, load_corpus
from cfnode.model.stages import HeadStage, build_stage
from cfnode.model.tokenizer import load_tokenizer
from cfnode.train.schedule import AttemptKey, tokens_per_step
from cfnode.train.worker import StageWorker

DATA_SEED = 0  # `cfnode join --seed` default


@dataclass
class Result:
    setup: str
    processes: str
    tokens_per_s: float | None = None
    step_s: float | None = None
    losses: list[float] = field(default_factory=list)
    """Mean loss of every step (warmup included), in step order."""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


def set_rates(result: Result, end_times: list[float], warmup: int, tokens: int) -> None:
    """tokens/s and s/step over the steps after `warmup`, from the wall time at which each step ended.

    Also the median step time: robust to a few steps slowed down by other jobs on a shared machine.
    """
    steps = len(end_times) - warmup
    elapsed = end_times[-1] - end_times[warmup - 1]
    result.tokens_per_s, result.step_s = tokens * steps / elapsed, elapsed / steps
    median = statistics.median(b - a for a, b in zip(end_times[warmup - 1:], end_times[warmup:], strict=False))
    result.extra["median_step_s"] = round(median, 4)
    result.extra["median_tokens_per_s"] = round(tokens / median, 1)


def load_summary(ours_cores: float, busy_before: float, busy_after: float, window_s: float) -> dict[str, float]:
    """Cores busy over the timed window: ours, and everything else on the machine (noise from other jobs)."""
    machine = (busy_after - busy_before) / window_s
    return {"cores_busy": round(ours_cores, 2), "machine_cores_busy": round(machine, 2),
            "other_load_cores": round(max(0.0, machine - ours_cores), 2)}


def add_cpu_efficiency(result: Result) -> None:
    """tokens per CPU-second the setup burnt: less sensitive to other jobs than tokens/s (not insensitive)."""
    cores = result.extra.get("cores_busy")
    if result.tokens_per_s and cores:
        result.extra["tokens_per_cpu_s"] = round(result.tokens_per_s / cores, 1)



def load_train_tokens() -> torch.Tensor:
    return TokenData.from_corpus(load_corpus(None), load_tokenizer()).train


def step_batch(tokens: torch.Tensor, step: int, cfg: ModelConfig, train: TrainConfig) -> torch.Tensor:
    return batch_for_step(tokens, seed=DATA_SEED, step=step, num_microbatches=train.num_microbatches,
                          microbatch_size=train.microbatch_size, seq_len=cfg.seq_len)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------- (a) single process


def run_single(cfg: ModelConfig, train: TrainConfig, tokens: torch.Tensor, total_steps: int, warmup: int,
               threads: int) -> Result:
    """Every stage in this process; microbatches in the order a stage-0 window of `max_in_flight` gives."""
    result = Result("(a) single process", f"1 x {threads} threads")
    torch.set_num_threads(threads)
    workers = [StageWorker(build_stage(cfg, i), stage_idx=i, lr=train.lr, clip_norm=train.clip_norm)
               for i in range(cfg.num_stages + 1)]
    head, blocks = workers[0], workers[1:]
    num_mb = train.num_microbatches
    end_times: list[float] = []
    cpu_start = busy_start = 0.0
    for step in range(total_steps):
        if step == warmup:
            cpu_start, busy_start = time.process_time(), system_busy_s()
        key = AttemptKey(step, 1)
        batch = step_batch(tokens, step, cfg, train)
        targets = batch[:, :, 1:]
        for w in workers:
            w.begin(key)
        losses: dict[int, float] = {}
        pending: deque[tuple[int, torch.Tensor]] = deque()

        def backward(mb: int, grad: torch.Tensor) -> None:
            for w in reversed(blocks):
                grad = w.backward(key, mb, grad)  # noqa: B023 - runs within this iteration
            head.embed_backward(key, mb, grad)  # noqa: B023

        # The ring with a window of F: f0 .. f{F-1}, then b0 f{F} b1 f{F+1} ... (each f includes head + loss).
        for mb in range(num_mb):
            hidden = head.embed(key, mb, batch[mb, :, :-1])
            for w in blocks:
                hidden = w.forward(key, mb, hidden)
            losses[mb], grad = head.head_backward(key, mb, hidden, targets[mb], num_mb)
            pending.append((mb, grad))
            if len(pending) >= train.max_in_flight:
                backward(*pending.popleft())
        while pending:
            backward(*pending.popleft())
        for w in blocks:  # the driver commits stages 1..L, then stage 0
            w.commit(key, num_mb)
        head.commit(key, num_mb)
        end_times.append(time.perf_counter())
        result.losses.append(sum(losses.values()) / len(losses))
    cpu, busy_end = time.process_time() - cpu_start, system_busy_s()
    set_rates(result, end_times, warmup, tokens_per_step(num_mb, train.microbatch_size, cfg.seq_len))
    window = end_times[-1] - end_times[warmup - 1]
    result.extra.update(load_summary(cpu / window, busy_start, busy_end, window))
    return result


# ---------------------------------------------------------------------------------------- (b) cfnode swarm


def _cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """{pid: ("main" | "children", CPU seconds)} of a process and its descendants (DHT process, p2pd)."""
    try:
        import psutil
    except ImportError:
        return {}
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        out[pid] = ("main", sum(proc.cpu_times()[:2]))
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                out[child.pid] = ("children", sum(child.cpu_times()[:2]))
    return out


def _rpc_latency_ms(ready_file: str) -> dict[str, float]:
    """Mean latency per RPC method and side from a node's Prometheus endpoint (whole run, warmup included).

    Client side of forward/backward: one activation/gradient push on loopback until the receiver's ack
    (transport + decode + validation on the receiver; the receiver computes after acking).
    """
    import urllib.request

    try:
        with open(ready_file, encoding="utf-8") as f:
            port = json.load(f)["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    pattern = re.compile(r'^cfnode_rpc_duration_seconds_(sum|count)\{method="(\w+)",side="(\w+)"\} (\S+)$')
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            (sums if m.group(1) == "sum" else counts)[f"{m.group(2)}/{m.group(3)}"] = float(m.group(4))
    return {k: round(1000 * sums[k] / counts[k], 2) for k in sums if counts.get(k)}


def _bytes_sent(ready_files: list[str]) -> dict[str, float]:
    """cfnode_transfer_bytes_total{direction="sent"} summed over the swarm's nodes, by kind."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for path in ready_files:
        with open(path, encoding="utf-8") as f:
            port = json.load(f)["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "cfnode_transfer_bytes_total" and sample.labels.get("direction") == "sent":
                    kind = sample.labels["kind"]
                    out[kind] = out.get(kind, 0.0) + sample.value
    return out


def run_swarm(cfg: ModelConfig, train: TrainConfig, total_steps: int, warmup: int, workdir: str,
              timeout_s: float, recovery: str = "checkfree", extra_join: tuple[str, ...] = ()) -> Result:
    """`extra_join`: more `cfnode join` flags for every node (bench/wire.py: `--wire-dtype`). The run validates
    every `train.val_every` steps (0: never); stage 0's validation losses land in `extra["val_losses"]`."""
    num_procs = cfg.num_stages + 1
    label = "(b) cfnode swarm" if recovery == "checkfree" else "(b+) swarm checkfree+"
    result = Result(label, f"{num_procs} x 1 thread + bootstrap")
    swarm = Swarm(workdir)
    started = time.monotonic()
    try:
        boot = swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
                                         "--identity-path", os.path.join(workdir, "bootstrap.id")])
        peer = wait_for_line(boot, JOIN_LINE, 60).group(1)
        common = ["--peers", peer, "--preset", cfg.preset, "--stages", str(cfg.num_stages),
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", "bench", "--threads", "1",
                  "--microbatches", str(train.num_microbatches),
                  "--microbatch-size", str(train.microbatch_size),
                  "--max-in-flight", str(train.max_in_flight), "--lr", str(train.lr), "--seed", str(DATA_SEED),
                  "--val-every", str(train.val_every), "--recovery", recovery, *extra_join]
        stages: list[Proc] = []
        ready_files = [os.path.join(workdir, f"stage{idx}.ready.json") for idx in range(num_procs)]
        bytes_at_warmup: dict[str, float] = {}
        bytes_step_at_warmup = bytes_step_at_end = 0
        bytes_at_end: dict[str, float] | None = None
        for idx in range(num_procs):
            extra = ["--max-steps", str(total_steps)] if idx == 0 else []
            extra += ["--metrics-port", "0", "--ready-file", os.path.join(workdir, f"stage{idx}.ready.json")]
            stages.append(swarm.spawn(f"stage{idx}", ["join", *common, "--stage", str(idx), *extra], events=True))
        head = stages[0]
        deadline = time.monotonic() + timeout_s
        cpu_last: dict[str, dict[int, tuple[str, float]]] = {}  # last sample per process name and pid
        cpu_at_warmup: dict[str, dict[int, tuple[str, float]]] | None = None
        busy_start = busy_end = 0.0
        first_step_at: float | None = None
        reported = 0
        while True:
            for proc in swarm.procs:
                sample = _cpu_seconds(proc.popen.pid)
                cpu_last.setdefault(proc.name, {}).update(sample)  # exited pids keep their last sample
            events = read_events(head.events_path)
            steps = [e for e in events if e["event"] == "step"]
            if steps and first_step_at is None:
                first_step_at = time.monotonic()
                print(f"  swarm: first step after {first_step_at - started:.1f}s of start-up", flush=True)
            if steps and steps[-1]["step"] >= warmup and cpu_at_warmup is None:
                cpu_at_warmup = {k: dict(v) for k, v in cpu_last.items()}
                busy_start = system_busy_s()
                bytes_at_warmup, bytes_step_at_warmup = _bytes_sent(ready_files), steps[-1]["step"]
            if steps and steps[-1]["step"] >= total_steps - 2 and bytes_at_end is None:  # stage 0 still up
                bytes_at_end, bytes_step_at_end = _bytes_sent(ready_files), steps[-1]["step"]
            busy_end = system_busy_s()
            if steps and steps[-1]["step"] >= reported + 10:
                reported = steps[-1]["step"] // 10 * 10
                print(f"  swarm: step {steps[-1]['step']}/{total_steps} loss {steps[-1]['loss']:.3f} "
                      f"({steps[-1]['tokens_per_s']:.0f} tok/s)", flush=True)
            if (steps and steps[-1]["step"] >= total_steps) or any(
                    e["event"] == "training_finished" for e in events):
                break
            for proc in [boot, *stages]:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"swarm did not finish {total_steps} steps in {timeout_s:.0f}s; "
                                   f"logs in {workdir}")
            time.sleep(0.25)
        result.extra["rpc_ms"] = {p.name: _rpc_latency_ms(os.path.join(workdir, f"{p.name}.ready.json"))
                                  for p in stages[1:] if p.alive()}
        if bytes_at_end is not None and bytes_step_at_end > bytes_step_at_warmup:
            n = bytes_step_at_end - bytes_step_at_warmup
            result.extra["bytes_sent_per_step"] = {k: round((v - bytes_at_warmup.get(k, 0.0)) / n)
                                                   for k, v in bytes_at_end.items() if v > bytes_at_warmup.get(k, 0.0)}
    finally:
        swarm.stop()
    by_step: dict[int, dict[str, Any]] = {}
    for e in read_events(head.events_path):
        if e["event"] == "step":
            by_step[e["step"]] = e  # a retried step appears once: only committed steps are logged
    if sorted(by_step) != list(range(1, total_steps + 1)):
        raise RuntimeError(f"stage 0 logged steps {sorted(by_step)}, expected 1..{total_steps}")
    end_times = [by_step[s]["time"] for s in range(1, total_steps + 1)]
    result.losses = [by_step[s]["loss"] for s in range(1, total_steps + 1)]
    result.extra["val_losses"] = {s: e["val_loss"] for s, e in sorted(by_step.items()) if e.get("val_loss") is not None}
    set_rates(result, end_times, warmup, tokens_per_step(train.num_microbatches, train.microbatch_size, cfg.seq_len))
    step_s = result.step_s
    timed = [by_step[s] for s in range(warmup + 1, total_steps + 1)]
    driver_step_s = sum(e["step_s"] for e in timed) / len(timed)
    aborted = [e for e in read_events(head.events_path) if e["event"] == "step_aborted"]
    result.extra.update({
        "startup_s": round((first_step_at or time.monotonic()) - started, 1),
        "driver_step_s": round(driver_step_s, 4),
        "between_steps_s": round(step_s - driver_step_s, 4),
        "steps_aborted": len(aborted),
    })
    if cpu_at_warmup:
        window = end_times[-1] - end_times[warmup - 1]
        cores: dict[str, dict[str, float]] = {}
        for name, pids in cpu_last.items():
            before = cpu_at_warmup.get(name, {})
            acc = {"main": 0.0, "children": 0.0}
            for pid, (role, seconds) in pids.items():
                acc[role] += seconds - before.get(pid, (role, 0.0))[1]
            cores[name] = {k: round(v / window, 2) for k, v in acc.items()}
        result.extra["cores_busy_per_process"] = cores
        ours = sum(sum(v.values()) for v in cores.values())
        result.extra.update(load_summary(ours, busy_start, busy_end, window))
    return result


# ------------------------------------------------------------------------- (c) torch.distributed.pipelining


class _EmbedPart(nn.Module):
    """First pipeline stage: the token embedding of HeadStage."""

    def __init__(self, head: HeadStage) -> None:
        super().__init__()
        self.embed_tokens = head.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class _HeadPart(nn.Module):
    """Last pipeline stage: final norm + LM head (the loss is ScheduleGPipe's loss_fn = HeadStage.loss)."""

    def __init__(self, head: HeadStage) -> None:
        super().__init__()
        self.norm, self.lm_head = head.norm, head.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def _pp_worker(rank: int, world: int, port: int, cfg_fields: dict[str, Any], train_fields: dict[str, Any],
               batches: torch.Tensor, warmup: int, out_dir: str, timeout_s: float) -> None:
    """One rank of the linear pipeline [embed] -> BlockStage 1..L -> [norm + head + loss]."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's data connections on loopback too, not just the store
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.set_num_threads(1)
    cfg, train = ModelConfig(**cfg_fields), TrainConfig(**train_fields)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        last = world - 1
        ends = dist.new_group([0, last])  # the two halves of cfnode's stage 0 clip jointly, as stage 0 does
        if rank in (0, last):
            full = build_stage(cfg, 0)
            module: nn.Module = _EmbedPart(full) if rank == 0 else _HeadPart(full)
        else:
            module = build_stage(cfg, rank)
        stage = PipelineStage(module, rank, world, torch.device("cpu"))
        # loss_fn on EVERY rank: the schedule enables backward only when it has one (only the last uses it).
        schedule = ScheduleGPipe(stage, n_microbatches=train.num_microbatches, loss_fn=HeadStage.loss)
        optimizer = torch.optim.Adam(module.parameters(), lr=train.lr, betas=(0.9, 0.999), weight_decay=0.0)
        end_times, losses = [], []
        cpu = {"start": 0.0, "busy_start": 0.0}
        for step in range(batches.shape[0]):
            if step == warmup:
                cpu = {"start": time.process_time(), "busy_start": system_busy_s()}
            flat = batches[step].reshape(-1, batches.shape[-1])  # (M*B, T+1); GPipe re-splits it into M
            if rank == 0:
                schedule.step(flat[:, :-1].contiguous())
            elif rank == last:
                mb_losses: list[torch.Tensor] = []
                schedule.step(target=flat[:, 1:].contiguous(), losses=mb_losses, return_outputs=False)
                losses.append(float(torch.stack([x.detach() for x in mb_losses]).mean()))
            else:
                schedule.step()
            params = [p for p in module.parameters() if p.grad is not None]
            sq = torch.stack([torch.linalg.vector_norm(p.grad) for p in params]).square().sum()
            if rank in (0, last):
                dist.all_reduce(sq, group=ends)
            coef = torch.clamp(train.clip_norm / (sq.sqrt() + 1e-6), max=1.0)  # = clip_grad_norm_
            for p in params:
                p.grad.mul_(coef)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end_times.append(time.time())
        cpu.update(end=time.process_time(), busy_end=system_busy_s())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "end_times": end_times, "losses": losses, "cpu": cpu}, f)
    finally:
        dist.destroy_process_group()


def run_pipelining(cfg: ModelConfig, train: TrainConfig, tokens: torch.Tensor, total_steps: int, warmup: int,
                   workdir: str, timeout_s: float) -> Result:
    import torch.multiprocessing as mp

    world = cfg.num_stages + 2
    result = Result("(c) torch pipelining", f"{world} x 1 thread (gloo)")
    out_dir = os.path.join(workdir, "pipelining")
    os.makedirs(out_dir, exist_ok=True)
    batches = torch.stack([step_batch(tokens, s, cfg, train) for s in range(total_steps)])
    args = (world, free_port(), asdict(cfg), asdict(train), batches, warmup, out_dir, min(timeout_s, 300.0))
    ctx = mp.start_processes(_pp_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):  # raises if a rank failed (and terminates the others)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipeline did not finish in {timeout_s:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = {}
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json"), encoding="utf-8") as f:
            ranks[r] = json.load(f)
    # Rank 0 finishes a step last (its embedding backward comes last), like cfnode's stage 0 commit.
    set_rates(result, ranks[0]["end_times"], warmup, tokens_per_step(
        train.num_microbatches, train.microbatch_size, cfg.seq_len))
    result.losses = ranks[world - 1]["losses"]
    window = ranks[0]["end_times"][-1] - ranks[0]["end_times"][warmup - 1]
    per_rank = {f"rank{r}": round((v["cpu"]["end"] - v["cpu"]["start"]) / window, 2) for r, v in ranks.items()}
    result.extra["cores_busy_per_process"] = per_rank
    result.extra.update(load_summary(sum(per_rank.values()), ranks[0]["cpu"]["busy_start"],
                                     ranks[0]["cpu"]["busy_end"], window))
    return result


# ----------------------------------------------------------------------------------------------- reporting


def max_loss_diff(a: list[float], b: list[float]) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def checkfree_plus_cost(plain: Result, plus: Result, plain_rounds: list[Result] | None = None,
                        plus_rounds: list[Result] | None = None) -> dict[str, Any]:
    """Side-by-side cost of CheckFree+ (swapped routes + stage-0 replicas) over plain CheckFree: the best rounds'
    ratio and, with several rounds, the ratio within each round (the two setups ran back to back, so a slow
    spell of the machine hits both) with its median and mean ± a 95 % Student-t interval."""
    b_plain = sum(plain.extra.get("bytes_sent_per_step", {}).values())
    b_plus = sum(plus.extra.get("bytes_sent_per_step", {}).values())
    assert plain.step_s and plus.step_s
    cost: dict[str, Any] = {
        "step_s_ratio": plus.step_s / plain.step_s,
        "median_step_s_ratio": plus.extra["median_step_s"] / plain.extra["median_step_s"],
        "bytes_plain": int(b_plain), "bytes_plus": int(b_plus),
        "bytes_ratio": b_plus / b_plain if b_plain else float("nan"),
        "replica_bytes": int(plus.extra.get("bytes_sent_per_step", {}).get("replica", 0))}
    paired = [b.step_s / a.step_s for a, b in zip(plain_rounds or [], plus_rounds or [], strict=False)
              if a.step_s and b.step_s]
    if len(paired) >= 2:
        mean = statistics.fmean(paired)
        half = stats.t.ppf(0.975, len(paired) - 1) * statistics.stdev(paired) / len(paired) ** 0.5
        cost.update(paired_step_s_ratios=[round(r, 4) for r in paired], paired_median=statistics.median(paired),
                    paired_mean=mean, paired_ci95=half)
    return cost


def print_table(results: list[Result], base: Result | None) -> None:
    head = f"{'setup':<22} {'processes':<28} {'tokens/s':>9} {'s/step':>8} {'vs (a)':>7} {'median':>8} " \
           f"{'cores':>6} {'tok/CPU-s':>9} {'other':>6} {'loss@end':>9} {'max|dloss| vs (a)':>18}"
    print(head)
    print("-" * len(head))
    for r in results:
        if r.tokens_per_s is None:
            print(f"{r.setup:<22} {r.processes:<28} {'n/a':>9} {'n/a':>8} {'n/a':>7}   ({r.error})")
            continue
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base and base.tokens_per_s else "n/a"
        diff = max_loss_diff(base.losses, r.losses) if base and r is not base else None
        loss = f"{r.losses[-1]:.4f}" if r.losses else "-"
        cores, other = r.extra.get("cores_busy", "-"), r.extra.get("other_load_cores", "-")
        median = r.extra.get("median_tokens_per_s")
        median_s = f"{median:.0f}" if median else "-"
        per_cpu = r.extra.get("tokens_per_cpu_s")
        per_cpu_s = f"{per_cpu:.0f}" if per_cpu else "-"
        print(f"{r.setup:<22} {r.processes:<28} {r.tokens_per_s:>9.0f} {r.step_s:>8.3f} {ratio:>7} {median_s:>8} "
              f"{cores:>6} {per_cpu_s:>9} {other:>6} {loss:>9} {'-' if diff is None else f'{diff:.2e}':>18}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--stages", type=int, default=2, help="L transformer stages (2 fits 2 cores; 4 works)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (>= 1)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--max-in-flight", type=int, default=TrainConfig.max_in_flight)
    parser.add_argument("--threads", type=int, default=2,
                        help="thread budget of (a): the cores the multi-process setups share")
    parser.add_argument("--setups", default="single,swarm,pipelining",
                        help="comma-separated subset of single,swarm,swarm+,pipelining (swarm+: the swarm with "
                             "--recovery checkfree+, needs --stages >= 4)")
    parser.add_argument("--join-flags", default="",
                        help="more `cfnode join` flags for every swarm node, e.g. '--event-loop asyncio'")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for (b) and for (c)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all setups; the table shows each setup's best round")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each setup, wait up to this many seconds for the machine to be idle")
    parser.add_argument("--workdir", default=None, help="keep logs here (default: a temp dir, removed on success)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    # Ctrl-C / SIGTERM (also when started in the background, where SIGINT is ignored) unwind through the
    # finally blocks that stop the swarm and the pipeline ranks.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.warmup < 1 or args.steps < 1 or args.repeat < 1:
        parser.error("--warmup, --steps and --repeat must be >= 1")
    setups = {s.strip() for s in args.setups.split(",") if s.strip()}
    known = {"single", "swarm", "swarm+", "pipelining"}
    if setups - known:
        parser.error(f"unknown setup(s) {sorted(setups - known)}")

    cfg = preset(args.preset, num_stages=args.stages)
    train = TrainConfig(num_microbatches=args.microbatches, microbatch_size=args.microbatch_size,
                        max_in_flight=args.max_in_flight, val_every=0)
    total = args.warmup + args.steps
    workdir = args.workdir or tempfile.mkdtemp(prefix="cfnode-bench-")
    os.makedirs(workdir, exist_ok=True)
    tokens_step = tokens_per_step(train.num_microbatches, train.microbatch_size, cfg.seq_len)
    print(f"model: preset {cfg.preset}, L={cfg.num_stages} stages x {cfg.layers_per_stage} layers "
          f"(d={cfg.hidden_size}, T={cfg.seq_len}, V={cfg.vocab_size}); schedule: M={train.num_microbatches} x "
          f"B={train.microbatch_size}, max in flight {train.max_in_flight} = {tokens_step} tokens/step; "
          f"{args.warmup} warmup + {args.steps} timed steps; {os.cpu_count()} CPUs; workdir {workdir}", flush=True)
    tokens = load_train_tokens()
    revision = git_revision()  # at the start: the code that runs (the checkout may move during a long run)

    names = {"single": ("(a) single process", f"1 x {args.threads} threads"),
             "swarm": ("(b) cfnode swarm", f"{cfg.num_stages + 1} x 1 thread + bootstrap"),
             "swarm+": ("(b+) swarm checkfree+", f"{cfg.num_stages + 1} x 1 thread + bootstrap"),
             "pipelining": ("(c) torch pipelining", f"{cfg.num_stages + 2} x 1 thread (gloo)")}
    runs: dict[str, list[Result]] = {name: [] for name in names if name in setups}
    failed = False
    for round_idx in range(args.repeat):
        order = list(runs) if round_idx % 2 == 0 else list(runs)[::-1]  # ABBA: a drifting machine favours neither
        for name in order:
            if args.wait_quiet > 0:
                waited = wait_until_quiet(args.wait_quiet)
                print(f"waited {waited:.0f}s for an idle machine", flush=True)
            label = f" (round {round_idx + 1}/{args.repeat})" if args.repeat > 1 else ""
            print(f"running {names[name][0]}{label} ...", flush=True)
            started = time.monotonic()
            rundir = os.path.join(workdir, f"{name}-{round_idx + 1}")
            os.makedirs(rundir, exist_ok=True)
            try:
                if name == "single":
                    res = run_single(cfg, train, tokens, total, args.warmup, args.threads)
                elif name in ("swarm", "swarm+"):
                    res = run_swarm(cfg, train, total, args.warmup, rundir, args.timeout,
                                    recovery="checkfree+" if name == "swarm+" else "checkfree",
                                    extra_join=tuple(shlex.split(args.join_flags)))
                else:
                    res = run_pipelining(cfg, train, tokens, total, args.warmup, rundir, args.timeout)
            except Exception as e:  # noqa: BLE001 - one failed setup must not sink the others
                failed = True
                res = Result(*names[name])
                detail = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
                res.error = f"{type(e).__name__}: {detail[-1] if detail else ''}"[:200]
                print(f"  {res.setup} failed: {res.error}", flush=True)
                traceback.print_exc()
            res.extra["wall_s"] = round(time.monotonic() - started, 1)
            add_cpu_efficiency(res)
            if res.tokens_per_s is not None:
                print(f"  {res.tokens_per_s:.0f} tokens/s, {res.step_s:.3f} s/step, "
                      f"extra {json.dumps(res.extra)}", flush=True)
            runs[name].append(res)

    # Best of the rounds per setup: on a shared machine, slower rounds are the ones other jobs slowed down.
    results: list[Result] = []
    for done in runs.values():
        ok = [r for r in done if r.tokens_per_s is not None]
        best = max(ok, key=lambda r: r.tokens_per_s or 0.0) if ok else done[-1]
        if len(done) > 1:
            best.extra["rounds"] = [{"tokens_per_s": r.tokens_per_s, "step_s": r.step_s, "error": r.error,
                                     "other_load_cores": r.extra.get("other_load_cores"),
                                     "median_tokens_per_s": r.extra.get("median_tokens_per_s")} for r in done]
        results.append(best)

    base = next((r for r in results if r.setup.startswith("(a)") and r.tokens_per_s), None)
    print()
    print_table(results, base)
    plain = next((r for r in results if r.setup.startswith("(b)") and r.step_s), None)
    plus = next((r for r in results if r.setup.startswith("(b+)") and r.step_s), None)
    cost = checkfree_plus_cost(plain, plus, runs.get("swarm"), runs.get("swarm+")) if plain and plus else None
    if cost is not None:
        print(f"checkfree+ vs checkfree: step time {cost['step_s_ratio']:.3f}x (median {cost['median_step_s_ratio']:.3f}x)"
              f", bytes sent per step {cost['bytes_ratio']:.3f}x "
              f"({cost['bytes_plain']:,} -> {cost['bytes_plus']:,}; replica {cost['replica_bytes']:,})")
        if "paired_mean" in cost:
            print(f"  within each round: {', '.join(f'{r:.3f}x' for r in cost['paired_step_s_ratios'])}; median "
                  f"{cost['paired_median']:.3f}x, mean {cost['paired_mean']:.3f}x ± {cost['paired_ci95']:.3f} (95 %)")
    print("median: tokens/s of the median timed step; cores: CPU cores the setup kept busy over the timed steps; "
          "tok/CPU-s: tokens per CPU-second the setup used; other: cores busy with anything else on the machine "
          "meanwhile (noise)")
    if args.json:
        payload = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                        "torch": torch.__version__},
            "cfnode_revision": revision,
            "model": asdict(cfg),
            "train": {"num_microbatches": train.num_microbatches, "microbatch_size": train.microbatch_size,
                      "max_in_flight": train.max_in_flight, "lr": train.lr, "clip_norm": train.clip_norm},
            "warmup_steps": args.warmup, "timed_steps": args.steps, "tokens_per_step": tokens_step,
            "threads_single": args.threads, "rounds": args.repeat, "join_flags": args.join_flags,
            "checkfree_plus_cost": cost,
            "results": [{**asdict(r),
                         "ratio_vs_single": (r.tokens_per_s / base.tokens_per_s
                                             if base and r.tokens_per_s else None),
                         "max_abs_loss_diff_vs_single": (max_loss_diff(base.losses, r.losses)
                                                         if base and r is not base else None)}
                        for r in results],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.workdir is None and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"logs kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
