"""What the harness swaps in around the node code for the length of a scenario, and undoes afterwards:

* memoised package versions (every NodeMetrics reads them for cfnode_build_info), memoised stage builds (`build_stage`,
  in a rebuild and in a group's newcomer, deep-copies one cached module per (config, stage)) and a memoised
  corpus + token tensor for `Driver.prepare`: the real code runs, without paying ~0.1 s per node for them;
* a `time` stand-in (clock.py `TimeShim`) in the modules that read the `time` module directly (the driver's
  attempt ids, the durations in events), so they follow the calling node's virtual clock;
* a ledger of every `StageWorker` (built, installed, restored or an exact copy of a group member) and its
  optimizer steps (a global torch step hook), for the invariant "updates == committed steps".
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from cfnode.testing.clock import CURRENT_NODE, ClockRegistry, TimeShim

TIME_READERS = ("cfnode.train.driver", "cfnode.node.rebuild", "cfnode.recovery.coordinator", "cfnode.net.client",
                "cfnode.net.service", "cfnode.recovery.copies", "cfnode.train.worker", "cfnode.node.join",
                "cfnode.node.commits")
"""Modules that call time.time() / time.perf_counter() themselves (they do not take the node's Clock)."""


@functools.lru_cache(maxsize=32)
def _pristine_stage(cfg: Any, stage_idx: int) -> nn.Module:
    from cfnode.model.stages import build_stage

    return build_stage(cfg, stage_idx)


def cached_build_stage(cfg: Any, stage_idx: int, model_path: str | None = None) -> nn.Module:
    """`build_stage` for seeded weights, from a cached copy (identical tensors, fresh module)."""
    if model_path is not None:
        from cfnode.model.stages import build_stage

        return build_stage(cfg, stage_idx, model_path)
    return copy.deepcopy(_pristine_stage(cfg, stage_idx))


_CORPORA: dict[str | None, Any] = {}
_TOKENS: dict[str, Any] = {}


@dataclass
class WorkerLedger:
    """One StageWorker: who built it, and per optimizer it has had, the step it was installed at and how many
    times that optimizer stepped."""

    node: str | None
    worker: Any
    epochs: list[tuple[torch.optim.Optimizer, int]] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)

    def begin_epoch(self) -> None:
        opt = self.worker.optimizer
        self.epochs.append((opt, int(self.worker.step)))
        self.counts.setdefault(id(opt), 0)

    def current(self) -> tuple[int, int]:
        """(step at which the current optimizer was installed, its optimizer steps since)."""
        opt, base = self.epochs[-1]
        if opt is not self.worker.optimizer:  # replaced outside install/restore: count from its first step
            return base, -1
        return base, self.counts[id(opt)]


class Ledger:
    def __init__(self) -> None:
        self.workers: list[WorkerLedger] = []
        self._by_optimizer: dict[int, WorkerLedger] = {}
        self.unattributed_steps = 0

    def track(self, worker: Any) -> None:
        entry = next((w for w in self.workers if w.worker is worker), None)
        if entry is None:
            entry = WorkerLedger(CURRENT_NODE.get(), worker)
            self.workers.append(entry)
        entry.begin_epoch()
        self._by_optimizer[id(worker.optimizer)] = entry

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        entry = self._by_optimizer.get(id(optimizer))
        if entry is None or id(optimizer) not in entry.counts:
            self.unattributed_steps += 1
            return
        entry.counts[id(optimizer)] += 1


Swap = Callable[[Any, str, Any], None]


def _memoise(swap: Swap) -> None:
    from cfnode import metrics
    from cfnode.model import data
    from cfnode.node import join, rebuild

    swap(rebuild, "build_stage", cached_build_stage)
    swap(join, "build_stage", cached_build_stage)  # a newcomer's module, overwritten by its copy
    swap(metrics, "_version", functools.lru_cache(maxsize=None)(metrics._version))  # package metadata, per node
    original_load = data.load_corpus
    original_from_corpus = data.TokenData.from_corpus.__func__

    def load_corpus(source: str | None = None) -> Any:
        if source not in _CORPORA:
            _CORPORA[source] = original_load(source)
        return _CORPORA[source]

    def from_corpus(cls: Any, corpus: Any, tokenizer: Any, **kwargs: Any) -> Any:
        key = corpus.content_hash
        if key not in _TOKENS:
            _TOKENS[key] = original_from_corpus(cls, corpus, tokenizer, **kwargs)
        return _TOKENS[key]

    swap(data, "load_corpus", load_corpus)
    swap(data.TokenData, "from_corpus", classmethod(from_corpus))


def _track_workers(swap: Swap, ledger: Ledger) -> None:
    """Every StageWorker built, installed or restored enters the ledger (after the original method ran)."""
    from cfnode.train.worker import StageWorker

    for name in ("__init__", "install", "install_state", "restore"):
        original = getattr(StageWorker, name)

        def tracked(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            ledger.track(self)

        swap(StageWorker, name, tracked)


@contextlib.contextmanager
def patched(clocks: ClockRegistry, ledger: Ledger) -> Iterator[None]:
    """Install the memoisation, the time stand-in and the worker ledger; undo all of it on exit."""
    undo: list[tuple[Any, str, Any]] = []

    def swap(obj: Any, name: str, value: Any) -> None:
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    hook: Any = None
    try:
        _memoise(swap)
        shim = TimeShim(clocks)
        for module_name in TIME_READERS:
            swap(importlib.import_module(module_name), "time", shim)
        _track_workers(swap, ledger)
        hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: ledger.stepped(optimizer))
        yield
    finally:
        if hook is not None:
            hook.remove()
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
