"""The torch side of one stage: forward/backward per microbatch, stashes, clip + optimizer step, snapshots.

Every method runs on the node's single compute thread (never on the network loop), so the module and the
optimizer need no lock. Tensors arrive detached; each hop's autograd graph lives in the stash until its
backward. Partial state of an aborted attempt is dropped by `begin()` when a newer attempt starts.

Placement (cfnode/device.py): the module, its gradients and the Adam state live on `device`; every tensor a
method takes is moved there, and every tensor it returns (activations, gradients, snapshots, exported state,
gradient vectors) is on the CPU in float32. With a compute dtype other than float32 the forward passes run
under `torch.autocast`; float16 also scales the loss at stage 0's head by a static run-wide factor that every
stage divides out of its gradient before clipping.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cfnode.device import loss_scale, torch_dtype
from cfnode.train.accumulate import OrderedGrads, param_grads
from cfnode.train.schedule import AttemptKey, is_newer

if TYPE_CHECKING:
    from cfnode.config import TrainConfig

logger = logging.getLogger(__name__)

StashKey = tuple[AttemptKey, int]
THROUGHPUT_SMOOTHING = 0.2


class NonFiniteGradient(ValueError):
    """The accumulated gradient has a NaN/Inf norm: the attempt cannot be committed."""


def gradient_digest(params: list[torch.Tensor] | Any) -> str:
    """A short digest of the parameters' gradients' bits (members of a group compare theirs before applying)."""
    h = hashlib.sha256()
    for p in params:
        if p.grad is not None:
            h.update(p.grad.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_digest(module: nn.Module) -> str:
    """A short digest of a module's weights' bits."""
    h = hashlib.sha256()
    for _, v in sorted(module.state_dict().items()):
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` on the CPU (a clone when it already is there)."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.to("cpu")


def _host_tree(obj: Any) -> Any:
    """`obj` (dicts/lists/tuples of tensors and plain values: an optimizer's state_dict) copied, tensors on the CPU."""
    if isinstance(obj, torch.Tensor):
        return host_copy(obj)
    if isinstance(obj, dict):
        return {k: _host_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_tree(v) for v in obj)
    return copy.deepcopy(obj)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """What crosses to the event loop and the wire: on the CPU in float32 (the same tensor if it already is)."""
    return t.to(device="cpu", dtype=torch.float32)


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def worker_holds(worker: StageWorker) -> tuple[int, int]:
    """(committed steps, id of the active attempt or -1): what a stale-attempt rejection tells its sender."""
    return worker.step, worker.active.attempt if worker.active is not None else -1


class StageWorker:
    def __init__(self, module: nn.Module, *, stage_idx: int, lr: float, clip_norm: float,
                 device: str | torch.device | None = None, compute_dtype: str | torch.dtype = "float32",
                 every_microbatch: bool = True) -> None:
        """`device`: where the module (moved there if it is elsewhere), its gradients and Adam state live;
        default: where the module already is. `compute_dtype`: what the forward passes autocast to.
        `every_microbatch`: every microbatch of an attempt passes this stage (one peer per stage), so each
        gradient is added after all smaller microbatches' (False, a stage group's member, which gets only
        some: after the smaller ones whose forward it has seen; see train/accumulate.py)."""
        self.device = torch.device(device) if device is not None else _module_device(module)
        if any(t.device != self.device for t in (*module.parameters(), *module.buffers())):
            module.to(self.device)
        self.module = module
        self.compute_dtype = torch_dtype(compute_dtype)
        self.loss_scale = loss_scale(self.compute_dtype)
        """Static loss scale (float16: cfnode.device.FLOAT16_LOSS_SCALE; else 1, and nothing is scaled)."""
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
        """Microbatches whose gradients this attempt accumulated here (each at most once)."""
        self._accumulated: set[int] = set()
        self._head_accumulated: set[int] = set()
        self.every_microbatch = every_microbatch
        self._grads = OrderedGrads()
        self._head_grads = OrderedGrads()
        """Each microbatch's parameter gradients, added in microbatch order (train/accumulate.py)."""
        self._incarnation: dict[int, int] = {}
        """Microbatch -> the newest incarnation seen: stage 0 sends a microbatch again (one more incarnation) when
        a member on its path was lost; a member that already accumulated it then only passes the gradient on."""
        self.step = 0
        self.base_step = 0
        """The step this worker's weights were built or installed at: step == base_step + updates + skipped."""
        self.updates = 0
        """Adam steps applied by this worker (the protocol harness checks exactly-once commits with it)."""
        self.skipped = 0
        """Steps passed without an update (the swarm skipped them after a non-finite gradient)."""
        self.prepared: tuple[AttemptKey, float, float] | None = None
        self.prepared_digest = ""
        """Stage groups: the digest of the prepared (averaged, clipped) gradient, compared between members."""
        self.last_applied: tuple[AttemptKey, float, float] | None = None
        self.grad_norm = 1.0
        self.grad_norm_raw = 1.0
        self.donor = True
        """False from a rebuild's install() until the first commit (see StageRecord.donor)."""
        self.held: tuple[dict[str, torch.Tensor], int, tuple[float, float]] | None = None
        """A copy of another stage's (weights, step, (grad norm, raw grad norm)), replaced as one tuple so a
        reader on another thread never mixes two pushes (recovery/replicas.py says whose copy)."""
        self.throughput = 0.0
        """Microbatches per compute-second of this stage (forward + backward), smoothed; 0 until measured."""
        self._forward_s: dict[StashKey, float] = {}
        self._shadow: nn.Module | None = None

    @classmethod
    def for_train(cls, module: nn.Module, *, stage_idx: int, train: TrainConfig,
                  every_microbatch: bool = True) -> StageWorker:
        """The worker a node runs for `stage_idx`: lr, clipping, device and compute dtype from its TrainConfig."""
        return cls(module, stage_idx=stage_idx, lr=train.lr, clip_norm=train.clip_norm, device=train.device,
                   compute_dtype=train.compute_dtype, every_microbatch=every_microbatch)

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.module.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @property
    def shadow_module(self) -> nn.Module | None:
        """`redundant` mode: a module holding the replica, whose forward this stage runs redundantly (moved to
        this worker's device when set)."""
        return self._shadow

    @shadow_module.setter
    def shadow_module(self, module: nn.Module | None) -> None:
        if module is not None and _module_device(module) != self.device:
            module.to(self.device)
        self._shadow = module

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' precision: nothing for float32 (bit-for-bit the plain float32 pass)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

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
        self._forward_s.clear()
        self.module.zero_grad(set_to_none=True)
        self._reset_accumulation()
        self.prepared = None  # an attempt prepared and then aborted is never applied
        self.active = key
        return dropped

    def _reset_accumulation(self) -> None:
        self.backward_done = 0
        self._accumulated.clear()
        self._head_accumulated.clear()
        self._grads.clear()
        self._head_grads.clear()
        self._incarnation.clear()

    def accepts(self, key: AttemptKey) -> bool:
        return self.active is not None and key == self.active

    # -- transformer stages ------------------------------------------------------------------------------

    def _incarnate(self, mb: int, inc: int) -> None:
        """A forward of incarnation `inc` of microbatch `mb`: KeyError if a newer one was already seen."""
        if inc < self._incarnation.get(mb, 0):
            raise KeyError((mb, inc))
        self._incarnation[mb] = inc

    def _current(self, mb: int, inc: int) -> None:
        """A backward must belong to the incarnation whose forward we hold (KeyError: a superseded one)."""
        if inc != self._incarnation.get(mb, 0):
            raise KeyError((mb, inc))

    def _backward_into(self, mb: int, out: torch.Tensor, grad: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
        """Backward of one microbatch: into the parameters (in microbatch order, `OrderedGrads`) and `inputs` the
        first time this attempt sees it, else (an incarnation sent again around a lost member) into `inputs`
        only. Returns whether it accumulated."""
        first = mb not in self._accumulated
        grad = grad.to(device=out.device, dtype=out.dtype)
        if first:
            self._grads.add(mb, *param_grads(self.module, out, grad, inputs), seen=self._waits_for())
            self._accumulated.add(mb)
            self.backward_done += 1
        elif inputs:
            torch.autograd.backward(out, grad, inputs=inputs)
        return first

    def _waits_for(self) -> Collection[int] | None:
        """What a microbatch's gradient waits for (`OrderedGrads.add`): None, every smaller microbatch."""
        return None if self.every_microbatch else self._incarnation.keys()

    def forward(self, key: AttemptKey, mb: int, hidden: torch.Tensor, inc: int = 0) -> torch.Tensor:
        started = time.perf_counter()
        self._incarnate(mb, inc)
        x = self._here(hidden).detach().requires_grad_(True)
        with self._autocast():
            y = self.module(x)
        self.stash[(key, mb)] = (x, y)
        self._forward_s[(key, mb)] = time.perf_counter() - started
        return _to_host(y.detach())

    def backward(self, key: AttemptKey, mb: int, grad: torch.Tensor, inc: int = 0) -> torch.Tensor:
        started = time.perf_counter()
        self._current(mb, inc)
        x, y = self.stash.pop((key, mb))
        assert y is not None
        self._backward_into(mb, y, grad, [x])
        assert x.grad is not None
        self._measured(self._forward_s.pop((key, mb), 0.0) + time.perf_counter() - started)
        return _to_host(x.grad)

    def _measured(self, seconds: float) -> None:
        """Throughput (microbatches per compute-second, forward + backward), smoothed: what the driver's balancer
        and a newcomer choosing a group read from our record."""
        if seconds <= 0:
            return
        rate = 1.0 / seconds
        self.throughput = rate if self.throughput <= 0 else (1 - THROUGHPUT_SMOOTHING) * self.throughput + \
            THROUGHPUT_SMOOTHING * rate

    @torch.no_grad()
    def eval_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return _to_host(self.module(self._here(hidden)))

    # -- stage 0: embedding, head, loss ------------------------------------------------------------------

    def embed(self, key: AttemptKey, mb: int, ids: torch.Tensor, inc: int = 0) -> torch.Tensor:
        self._incarnate(mb, inc)
        with self._autocast():
            out = self.module.embed(self._here(ids))
        self.stash[(key, mb)] = (out, None)
        return _to_host(out.detach())

    def head_backward(self, key: AttemptKey, mb: int, hidden: torch.Tensor, targets: torch.Tensor,
                      num_microbatches: int) -> tuple[float, torch.Tensor]:
        """Loss of one microbatch and the gradient w.r.t. the last stage's output (head grads accumulate, once
        per microbatch and attempt: an incarnation sent again only yields the gradient).
        With float16 the gradient (and every gradient upstream of it) carries the static loss scale."""
        h = self._here(hidden).detach().requires_grad_(True)
        with self._autocast():
            logits = self.module.head(h)
        loss = self.module.loss(logits, self._here(targets))
        scaled = loss / num_microbatches
        if self.loss_scale != 1.0:
            scaled = scaled * self.loss_scale
        if mb in self._head_accumulated:
            scaled.backward(inputs=[h])
        else:
            self._head_grads.add(mb, *param_grads(self.module, scaled, None, [h]), seen=self._waits_for())
            self._head_accumulated.add(mb)
        assert h.grad is not None
        return float(loss.detach()), _to_host(h.grad)

    def embed_backward(self, key: AttemptKey, mb: int, grad: torch.Tensor, inc: int = 0) -> None:
        self._current(mb, inc)
        out, _ = self.stash.pop((key, mb))
        self._backward_into(mb, out, grad, [])

    @torch.no_grad()
    def eval_embed(self, ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return _to_host(self.module.embed(self._here(ids)))

    @torch.no_grad()
    def eval_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        with self._autocast():
            logits = self.module.head(self._here(hidden))
        return float(self.module.loss(logits, self._here(targets)))

    # -- commit (two phases: prepare, then apply; see docs/protocol.md) ---------------------------------

    def prepare(self, key: AttemptKey, num_microbatches: int) -> tuple[float, float]:
        """Phase 1: every microbatch's backward is in; clip and measure. Returns (grad_norm, grad_norm_raw);
        asked again for the same attempt it answers the same. Raises NonFiniteGradient (the gradient is dropped)
        or ValueError (not the active attempt, or backward passes missing). Nothing is applied yet."""
        if self.prepared is not None and self.prepared[0] == key:
            return self.prepared[1], self.prepared[2]
        self._check_complete(key, num_microbatches)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.loss_scale != 1.0:  # float16: divide the static scale out (exact: a power of two) before clipping
            for p in params:
                assert p.grad is not None
                p.grad.div_(self.loss_scale)
        return self._clip(key, params)

    def _check_complete(self, key: AttemptKey, num_microbatches: int) -> None:
        """The attempt is the active one and all its backward passes through this stage are in (ValueError)."""
        if not self.accepts(key):
            raise ValueError(f"commit of {tuple(key)} but the active attempt is {self.active}")
        if self.backward_done != num_microbatches:
            raise ValueError(f"commit of {tuple(key)} after {self.backward_done}/{num_microbatches} backward passes")
        self._grads.flush()
        self._head_grads.flush()

    def _clip(self, key: AttemptKey, params: list[nn.Parameter]) -> tuple[float, float]:
        """Clip `params`' gradients and record the attempt as prepared with (post-clip, raw) norms; a non-finite
        norm drops the gradient and raises NonFiniteGradient."""
        raw = float(torch.nn.utils.clip_grad_norm_(params, self.clip_norm))
        if not math.isfinite(raw):
            self.module.zero_grad(set_to_none=True)
            self._reset_accumulation()
            raise NonFiniteGradient(f"non-finite gradient norm at step {key.step}")
        post = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        self.prepared = (key, post, raw)
        return post, raw

    # -- stage groups: the gradient as one vector (averaged between members), exact copies of a member --------

    def gradient_vector(self, key: AttemptKey, num_microbatches: int) -> torch.Tensor:
        """This member's summed gradient of the attempt, divided by the microbatches it processed, as one float64
        vector in parameter order (zeros where it had none): what the group averages, weighted by those
        microbatches. Raises ValueError like `prepare`."""
        self._check_complete(key, num_microbatches)
        parts = [p.grad.reshape(-1).to("cpu").double() if p.grad is not None else
                 torch.zeros(p.numel(), dtype=torch.float64) for p in self.module.parameters()]
        vector = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        if self.loss_scale != 1.0:  # float16: unscaled here (the members' sum is the unscaled gradient)
            vector = vector / self.loss_scale
        return vector / num_microbatches if num_microbatches else vector

    def prepare_averaged(self, key: AttemptKey, total: torch.Tensor) -> tuple[float, float, str]:
        """Phase 1 of a group member: the group's summed gradient (float64, from the all-reduce) becomes the
        gradient, rounded to float32 (every member gets the same bits), then clipped and measured like `prepare`.
        Returns (grad_norm, grad_norm_raw, digest of the clipped gradient)."""
        if self.prepared is not None and self.prepared[0] == key:
            return self.prepared[1], self.prepared[2], self.prepared_digest
        if not self.accepts(key):
            raise ValueError(f"commit of {tuple(key)} but the active attempt is {self.active}")
        offset = 0
        for p in self.module.parameters():
            n = p.numel()
            p.grad = total[offset:offset + n].to(device=p.device, dtype=p.dtype).reshape(p.shape)
            offset += n
        params = list(self.module.parameters())
        post, raw = self._clip(key, params)
        self.prepared_digest = gradient_digest(params)
        return post, raw, self.prepared_digest

    def export_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Weights, Adam state and step for a newcomer of this stage's group: with them it is bit-identical to
        this member from the next step on. Tensors are named `weights/<param>` and `adam/<param>/<key>`."""
        tensors = {f"weights/{k}": host_copy(v) for k, v in self.module.state_dict().items()}
        names = dict((id(p), n) for n, p in self.module.named_parameters())
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    tensors[f"adam/{names[id(p)]}/{k}"] = host_copy(v).reshape(-1) if v.dim() == 0 else \
                        host_copy(v)
        meta = {"step": self.step, "lr": self.lr, "grad_norm": self.grad_norm, "grad_norm_raw": self.grad_norm_raw}
        return meta, tensors

    def install_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Become an exact copy of a group member (`export_state`): weights, Adam state, lr, step and norms."""
        weights = {k[len("weights/"):]: v for k, v in tensors.items() if k.startswith("weights/")}
        self.module.load_state_dict(weights, strict=True)
        self.lr = float(meta["lr"])
        self.optimizer = self._make_optimizer(self.lr)
        params = dict(self.module.named_parameters())
        for key, value in tensors.items():
            if not key.startswith("adam/"):
                continue
            _, name, field_name = key.split("/", 2)
            if name not in params:
                raise ValueError(f"optimizer state for unknown parameter {name!r}")
            p = params[name]
            state = self.optimizer.state[p]
            if field_name == "step":
                state["step"] = value.reshape(()).clone().to(torch.float32)
            elif value.shape == p.shape:
                state[field_name] = value.to(device=p.device, dtype=p.dtype, copy=True)
            else:
                raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        self.stash.clear()
        self.module.zero_grad(set_to_none=True)
        self.active = None
        self._reset_accumulation()
        self.step = int(meta["step"])
        self.grad_norm, self.grad_norm_raw = float(meta["grad_norm"]), float(meta["grad_norm_raw"])
        self._rebase(self.step)

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
        self._reset_accumulation()
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
        return {name: host_copy(t) for name, t in self.module.state_dict().items()}

    def install(self, state: dict[str, torch.Tensor], *, step: int, lr: float) -> None:
        """Load rebuilt weights with a fresh optimizer at `lr` (CheckFree: no optimizer state is recovered)."""
        self.module.load_state_dict(state, strict=True)
        self.lr = lr
        self.optimizer = self._make_optimizer(lr)
        self.stash.clear()
        self.active = None
        self._reset_accumulation()
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
            with self._autocast():
                self.shadow_module(self._here(hidden))

    # -- checkpoint baseline -----------------------------------------------------------------------------

    def checkpoint_payload(self) -> dict[str, Any]:
        """Weights, Adam state, step and lr: what `--recovery checkpoint` saves (copied, so it can be written
        while training goes on)."""
        return {"step": self.step, "lr": self.lr, "state": self.snapshot(),
                "optimizer": _host_tree(self.optimizer.state_dict())}

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
        self._reset_accumulation()
        self.step = step
        self._rebase(step)
        self.attempt_floor = max(self.attempt_floor, attempt_floor)
