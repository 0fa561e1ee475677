"""The swarm's training, in one process: the same stages, StageWorker, data order and commit, with every
microbatch of a step run through the stages in order. What a swarm of any layout must reproduce (up to float
summation order)."""

from __future__ import annotations

import torch

from cfnode.config import NodeConfig
from cfnode.model.data import TokenData, batch_for_step, load_corpus
from cfnode.model.stages import build_stage
from cfnode.model.tokenizer import load_tokenizer
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import StageWorker


def reference_losses(cfg: NodeConfig, steps: int) -> list[float]:
    """Mean training loss of steps 1..`steps` (as stage 0 reports them) for the run `cfg` describes."""
    torch.manual_seed(0)
    model, train = cfg.model, cfg.train
    data = TokenData.from_corpus(load_corpus(cfg.data.source), load_tokenizer())
    workers = [StageWorker(build_stage(model, i), stage_idx=i, lr=train.lr, clip_norm=train.clip_norm)
               for i in range(model.num_stages + 1)]
    losses = []
    for step in range(train.start_step, train.start_step + steps):
        key = AttemptKey(step, step + 1)
        batch = batch_for_step(data.train, seed=cfg.data.seed, step=step, num_microbatches=train.num_microbatches,
                               microbatch_size=train.microbatch_size, seq_len=model.seq_len)
        for w in workers:
            w.begin(key)
        step_losses = []
        for mb in range(train.num_microbatches):
            hidden = workers[0].embed(key, mb, batch[mb, :, :-1])
            for w in workers[1:]:
                hidden = w.forward(key, mb, hidden)
            loss, grad = workers[0].head_backward(key, mb, hidden, batch[mb, :, 1:], train.num_microbatches)
            step_losses.append(loss)
            for w in reversed(workers[1:]):
                grad = w.backward(key, mb, grad)
            workers[0].embed_backward(key, mb, grad)
        for w in workers:
            w.commit(key, train.num_microbatches)
        losses.append(sum(step_losses) / len(step_losses))
    return losses
