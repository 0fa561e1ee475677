"""The torch side of one stage: forward/backward per microbatch, stashes, clip + optimizer step, snapshots.

Every method runs on the node's single compute thread (never on the network loop), so the module and the
optimizer need no lock. Tensors arrive detached; each hop's autograd graph lives in the stash until its
backward. Partial state of an aborted attempt is dropped by `begin()` when a newer attempt starts.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from cfnode.train.schedule import AttemptKey, is_newer

logger = logging.getLogger(__name__)

StashKey = tuple[AttemptKey, int]


class NonFiniteGradient(ValueError):
    """The accumulated gradient has a NaN/Inf norm: the attempt cannot be committed."""


def worker_holds(worker: StageWorker) -> tuple[int, int]:
    """(committed steps, id of the active attempt or -1): what a stale-attempt rejection tells its sender."""
    return worker.step, worker.active.attempt if worker.active is not None else -1


class StageWorker:
    def __init__(self, module: nn.Module, *, stage_idx: int, lr: float, clip_norm: float) -> None:
        self.module = module
        self.stage_idx = stage_idx
        self.is_head = stage_idx == 0
        self.clip_norm = clip_norm
        self.lr = lr
        self.optimizer = self._make_optimizer(lr)
        self.stash: dict[StashKey, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.active: AttemptKey | None = None
        self.attempt_floor = -1
        """Attempt ids at or below this belong to before the last rollback and are never started."""
        self.backward_done = 0
        self.step = 0
        self.base_step = 0
        """The step this worker's weights were built or installed at: step == base_step + updates + skipped."""
        self.updates = 0
        """Adam steps applied by this worker (the protocol harness checks exactly-once commits with it)."""
        self.skipped = 0
        """Steps passed without an update (the swarm skipped them after a non-finite gradient)."""
        self.prepared: tuple[AttemptKey, float, float] | None = None
        self.last_applied: tuple[AttemptKey, float, float] | None = None
        self.grad_norm = 1.0
        self.grad_norm_raw = 1.0
        self.donor = True
        """False from a rebuild's install() until the first commit (see StageRecord.donor)."""
        self.held: tuple[dict[str, torch.Tensor], int, tuple[float, float]] | None = None
        """A copy of another stage's (weights, step, (grad norm, raw grad norm)), replaced as one tuple so a
        reader on another thread never mixes two pushes (recovery/replicas.py says whose copy)."""
        self.shadow_module: nn.Module | None = None
        """`redundant` mode: a module holding the replica, whose forward this stage runs redundantly."""

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    # -- attempt lifecycle -------------------------------------------------------------------------------

    def begin(self, key: AttemptKey) -> int:
        """Make `key` the active attempt if it is newer; drop older partial state. Returns stash entries dropped.

        After a rollback (`restore`) the step goes down, so attempts from before it would compare as newer:
        `attempt_floor` (stage 0's last attempt id at the rollback) keeps them out."""
        if not is_newer(key, self.active) or key.attempt <= self.attempt_floor:
            return 0
        dropped = len(self.stash)
        self.stash.clear()
        self.module.zero_grad(set_to_none=True)
        self.backward_done = 0
        self.prepared = None  # an attempt prepared and then aborted is never applied
        self.active = key
        return dropped

    def accepts(self, key: AttemptKey) -> bool:
        return self.active is not None and key == self.active

    # -- transformer stages ------------------------------------------------------------------------------

    def forward(self, key: AttemptKey, mb: int, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.detach().requires_grad_(True)
        y = self.module(x)
        self.stash[(key, mb)] = (x, y)
        return y.detach()

    def backward(self, key: AttemptKey, mb: int, grad: torch.Tensor) -> torch.Tensor:
        x, y = self.stash.pop((key, mb))
        assert y is not None
        torch.autograd.backward(y, grad)
        self.backward_done += 1
        assert x.grad is not None
        return x.grad

    @torch.no_grad()
    def eval_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module(hidden)

    # -- stage 0: embedding, head, loss ------------------------------------------------------------------

    def embed(self, key: AttemptKey, mb: int, ids: torch.Tensor) -> torch.Tensor:
        out = self.module.embed(ids)
        self.stash[(key, mb)] = (out, None)
        return out.detach()

    def head_backward(self, key: AttemptKey, mb: int, hidden: torch.Tensor, targets: torch.Tensor,
                      num_microbatches: int) -> tuple[float, torch.Tensor]:
        """Loss of one microbatch and the gradient w.r.t. the last stage's output (head grads accumulate)."""
        h = hidden.detach().requires_grad_(True)
        loss = self.module.loss(self.module.head(h), targets)
        (loss / num_microbatches).backward()
        assert h.grad is not None
        return float(loss.detach()), h.grad

    def embed_backward(self, key: AttemptKey, mb: int, grad: torch.Tensor) -> None:
        out, _ = self.stash.pop((key, mb))
        torch.autograd.backward(out, grad)
        self.backward_done += 1

    @torch.no_grad()
    def eval_embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.module.embed(ids)

    @torch.no_grad()
    def eval_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        return float(self.module.loss(self.module.head(hidden), targets))

    # -- commit (two phases: prepare, then apply; see docs/protocol.md) ---------------------------------

    def prepare(self, key: AttemptKey, num_microbatches: int) -> tuple[float, float]:
        """Phase 1: every microbatch's backward is in; clip and measure. Returns (grad_norm, grad_norm_raw);
        asked again for the same attempt it answers the same. Raises NonFiniteGradient (the gradient is dropped)
        or ValueError (not the active attempt, or backward passes missing). Nothing is applied yet."""
        if self.prepared is not None and self.prepared[0] == key:
            return self.prepared[1], self.prepared[2]
        if not self.accepts(key):
            raise ValueError(f"commit of {tuple(key)} but the active attempt is {self.active}")
        if self.backward_done != num_microbatches:
            raise ValueError(f"commit of {tuple(key)} after {self.backward_done}/{num_microbatches} backward passes")
        params = [p for p in self.module.parameters() if p.grad is not None]
        raw = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm))
        if not math.isfinite(raw):
            self.module.zero_grad(set_to_none=True)
            self.backward_done = 0
            raise NonFiniteGradient(f"non-finite gradient norm at step {key.step}")
        post = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        self.prepared = (key, post, raw)
        return post, raw

    def apply(self, key: AttemptKey, *, skip: bool = False) -> tuple[float, float]:
        """Phase 2: the Adam step of the prepared attempt (or, with `skip`, the step passes without an update:
        the swarm-wide decision after a non-finite gradient). Idempotent: the attempt already applied is answered
        again with its result. Raises ValueError for an attempt that is neither prepared nor applied."""
        if self.last_applied is not None and self.last_applied[0] == key:
            return self.last_applied[1], self.last_applied[2]
        if skip:
            if key.step != self.step:
                raise ValueError(f"skip of step {key.step}, this stage is at step {self.step}")
            post, raw = math.nan, math.nan
            self.skipped += 1
        else:
            if self.prepared is None or self.prepared[0] != key:
                raise ValueError(f"apply of {tuple(key)} but the prepared attempt is "
                                 f"{None if self.prepared is None else tuple(self.prepared[0])}")
            _, post, raw = self.prepared
            self.optimizer.step()
            self.updates += 1
            self.grad_norm, self.grad_norm_raw = post, raw
        self.module.zero_grad(set_to_none=True)
        self.stash.clear()
        self.step = key.step + 1
        self.active = None
        self.prepared = None
        self.backward_done = 0
        self.donor = True
        self.last_applied = (key, post, raw)
        return post, raw

    def commit(self, key: AttemptKey, num_microbatches: int) -> tuple[float, float]:
        """Both phases at once (a stage that decides alone: tests, the single-process reference)."""
        self.prepare(key, num_microbatches)
        return self.apply(key)

    # -- weights -----------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A consistent copy of the stage's weights (taken between compute tasks, so never mid-update)."""
        return {name: t.detach().clone() for name, t in self.module.state_dict().items()}

    def install(self, state: dict[str, torch.Tensor], *, step: int, lr: float) -> None:
        """Load rebuilt weights with a fresh optimizer at `lr` (CheckFree: no optimizer state is recovered)."""
        self.module.load_state_dict(state, strict=True)
        self.lr = lr
        self.optimizer = self._make_optimizer(lr)
        self.stash.clear()
        self.active = None
        self.backward_done = 0
        self.step = step
        self._rebase(step)
        self.donor = False

    def start_at(self, step: int) -> None:
        """Initial weights of a run that starts at `step` (a resumed export): the first step committed is `step`."""
        self.step = step
        self._rebase(step)

    def _rebase(self, step: int) -> None:
        self.base_step, self.updates, self.skipped = step, 0, 0
        self.prepared = self.last_applied = None

    @property
    def replica(self) -> dict[str, torch.Tensor] | None:
        return self.held[0] if self.held is not None else None

    @property
    def replica_step(self) -> int:
        return self.held[1] if self.held is not None else -1

    @property
    def replica_norms(self) -> tuple[float, float]:
        return self.held[2] if self.held is not None else (1.0, 1.0)

    def store_replica(self, state: dict[str, torch.Tensor], *, step: int, grad_norm: float,
                      grad_norm_raw: float) -> bool:
        """Keep another stage's weights as of `step`; an older push than the one held is ignored. With a
        shadow module (`redundant`), load them into it too."""
        if step < self.replica_step:
            return False
        self.held = (state, step, (grad_norm, grad_norm_raw))
        if self.shadow_module is not None:
            self.shadow_module.load_state_dict(state, strict=True)
        return True

    @torch.no_grad()
    def shadow_forward(self, hidden: torch.Tensor) -> None:
        """`redundant`: compute the successor's forward on our output, as Bamboo does (the result is the
        redundancy's cost; it is discarded)."""
        if self.shadow_module is not None and self.replica is not None:
            self.shadow_module(hidden)

    # -- checkpoint baseline -----------------------------------------------------------------------------

    def checkpoint_payload(self) -> dict[str, Any]:
        """Weights, Adam state, step and lr: what `--recovery checkpoint` saves (copied, so it can be written
        while training goes on)."""
        return {"step": self.step, "lr": self.lr, "state": self.snapshot(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def restore(self, payload: dict[str, Any] | None, *, step: int, fresh: dict[str, torch.Tensor],
                attempt_floor: int = -1) -> None:
        """Roll back to a checkpoint (or, with None, to the seeded `fresh` weights at step 0); attempts with an id
        up to `attempt_floor` (issued before the rollback) are ignored from now on."""
        if payload is None:
            self.module.load_state_dict(fresh, strict=True)
            self.optimizer = self._make_optimizer(self.lr)
        else:
            if payload["step"] != step:
                raise ValueError(f"checkpoint holds step {payload['step']}, expected {step}")
            self.module.load_state_dict(payload["state"], strict=True)
            self.lr = float(payload["lr"])
            self.optimizer = self._make_optimizer(self.lr)
            self.optimizer.load_state_dict(payload["optimizer"])
        self.stash.clear()
        self.module.zero_grad(set_to_none=True)
        self.active = None
        self.backward_done = 0
        self.step = step
        self._rebase(step)
        self.attempt_floor = max(self.attempt_floor, attempt_floor)
