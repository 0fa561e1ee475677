"""The checkpointing baseline's store (`--recovery checkpoint`): a directory every node of a one-machine swarm
can reach, one subdirectory per checkpointed step.

    DIR/step{s}/stage{i}.pt     one stage's weights, Adam state, step and lr (torch.save, written atomically)
    DIR/step{s}/COMPLETE        written by stage 0 once every stage has saved step s

A checkpoint is usable only when COMPLETE exists: a rollback goes to the newest complete step, or to the
seeded initial weights (step 0) if there is none. Pure path logic plus small, atomic file I/O.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step{step}")


def stage_path(root: str, step: int, stage: int) -> str:
    return os.path.join(step_dir(root, step), f"stage{stage}.pt")


def is_checkpoint_step(step: int, every: int) -> bool:
    """Stage i saves after committing step s when s (its new step count) is a positive multiple of `every`."""
    return every > 0 and step > 0 and step % every == 0


def save_stage(root: str, step: int, stage: int, payload: dict[str, Any]) -> tuple[str, float, int]:
    """Write one stage's checkpoint atomically; returns (path, seconds, bytes)."""
    started = time.perf_counter()
    os.makedirs(step_dir(root, step), exist_ok=True)
    path = stage_path(root, step, stage)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path, time.perf_counter() - started, os.path.getsize(path)


def load_stage(root: str, step: int, stage: int) -> dict[str, Any]:
    return torch.load(stage_path(root, step, stage), weights_only=False)


def mark_complete(root: str, step: int, num_stages: int) -> None:
    """Stage 0, after every stage acknowledged its save of `step`: make the checkpoint usable."""
    missing = [i for i in range(num_stages + 1) if not os.path.exists(stage_path(root, step, i))]
    if missing:
        raise FileNotFoundError(f"checkpoint of step {step} lacks stages {missing}")
    tmp = os.path.join(step_dir(root, step), f"COMPLETE.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"step": step, "num_stages": num_stages, "time": time.time()}, f)
    os.replace(tmp, os.path.join(step_dir(root, step), "COMPLETE"))


def latest_complete(root: str | None) -> int:
    """The newest step with a COMPLETE checkpoint, or 0 (the seeded initial weights) if there is none."""
    if not root or not os.path.isdir(root):
        return 0
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
             and os.path.exists(os.path.join(root, name, "COMPLETE"))]
    return max(steps, default=0)
