"""Microbatch gradients summed in microbatch order, whatever order they arrive in.

Float addition is not associative: a stage that added each microbatch's gradient into `.grad` as its backward
arrived (autograd's own accumulation) would train different bits whenever the network delivered the backward
passes in another order, and two runs of one schedule, or a swarm and the local experiment engine, would part
at the last bit from the first reordered step on. `OrderedGrads` keeps a microbatch's gradients aside until
every smaller microbatch is added, so the sum is always taken in ascending microbatch order. In order, nothing
waits; a reordered arrival holds one gradient copy until its turn. A stage group's member, which gets only some
microbatches, waits only for the smaller ones whose forward it has seen (a forward that arrives after a larger
microbatch's backward then falls out of order)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn


class OrderedGrads:
    """One attempt's parameter gradients of one kind of backward pass (a stage's, or stage 0's head and
    embedding passes each: they touch disjoint parameters), added into `.grad` in microbatch order."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[list[nn.Parameter], Sequence[torch.Tensor | None]]] = {}
        self._added: set[int] = set()

    def add(self, mb: int, params: list[nn.Parameter], grads: Sequence[torch.Tensor | None],
            seen: Collection[int] | None) -> None:
        """Microbatch `mb`'s gradients of `params` (None: unused). It waits for every smaller microbatch
        (`seen` None: all of them pass here) or for the smaller ones among `seen` (those whose forward this
        stage has seen: a stage group's member gets only some)."""
        self._pending[mb] = (params, grads)
        for m in sorted(self._pending):
            if any(s < m and s not in self._added for s in (range(m) if seen is None else seen)):
                return
            self._take(m)

    def flush(self) -> None:
        """Add every gradient still waiting (a smaller microbatch's backward never came here), in order."""
        for m in sorted(self._pending):
            self._take(m)

    def clear(self) -> None:
        self._pending.clear()
        self._added.clear()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def _take(self, mb: int) -> None:
        params, grads = self._pending.pop(mb)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone(memory_format=torch.contiguous_format)
                else:
                    p.grad.add_(g)
        self._added.add(mb)


def param_grads(module: nn.Module, out: torch.Tensor, grad: torch.Tensor | None, inputs: Sequence[torch.Tensor]
                ) -> tuple[list[nn.Parameter], tuple[torch.Tensor | None, ...]]:
    """One backward pass of `out` (seeded with `grad`; None for a scalar loss): returns the trainable
    parameters and their gradients (None where unused), for `OrderedGrads.add`, and sets each of `inputs`'
    `.grad` as `torch.autograd.backward` would (they are fresh leaves)."""
    params = [p for p in module.parameters() if p.requires_grad]
    got = torch.autograd.grad(out, [*inputs, *params], grad, allow_unused=True)
    for x, g in zip(inputs, got, strict=False):
        x.grad = g
    return params, got[len(inputs):]
