"""Reading one stage from a local checkpoint directory without materialising the whole model.

`read_stage(model_path, stage_idx, num_stages)` builds the stage's module on the meta device from the
checkpoint's own `LlamaConfig` and fills it with only that stage's tensors, read one by one from the
safetensors file(s) (`model.safetensors`, or the shards that `model.safetensors.index.json` names), copied
to float32. Peak memory is the stage's own float32 bytes plus one tensor in flight, not the model's
(bench/stage_build_memory.py measures it). A checkpoint with tied embeddings gets an LM head cloned from the
embedding, as `load_pretrained` does. A checkpoint without safetensors (`pytorch_model.bin`) cannot be read by
slices: `None` is returned and the caller loads it whole.

No networking here; this module must not import hivemind.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from cfnode.errors import ConfigError
from cfnode.model.stages import BlockStage, HeadStage, model_key

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(model_path: str) -> dict[str, str] | None:
    """Checkpoint key -> the safetensors file holding it, or None when the checkpoint has no safetensors."""
    index = os.path.join(model_path, INDEX_FILE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(model_path, name) for key, name in weight_map.items()}
    single = os.path.join(model_path, SINGLE_FILE)
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return {key: single for key in f.keys()}
    return None


def stage_module(config: LlamaConfig, stage_idx: int, num_stages: int) -> nn.Module:
    """Stage `stage_idx`'s module with its parameters on the meta device (no memory); its decoder layers carry
    their model-wide indices, as `split_llama`'s do. The rotary embedding's non-persistent `inv_freq` is made
    on the CPU, since no checkpoint holds it."""
    k = config.num_hidden_layers // num_stages
    with torch.device("meta"):
        if stage_idx == 0:
            module: nn.Module = HeadStage(config)
        else:
            first = (stage_idx - 1) * k
            module = BlockStage(config, [LlamaDecoderLayer(config, layer_idx=first + j) for j in range(k)])
    if stage_idx != 0:
        module.rotary_emb = LlamaRotaryEmbedding(config=config)
    return module


def _read_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor as an owned float32 copy. `safe_open` maps the file and hands out tensors backed by that
    mapping (a private, copy-on-write view of the file: a checkpoint rewritten under a running node would show
    through); the copy is ours, and closing the file after each tensor unmaps its pages, so at most one
    tensor's file pages are resident besides the stage."""
    with safe_open(path, framework="pt") as f:
        mapped = f.get_tensor(key)
        tensor = mapped.to(torch.float32, copy=True)
        del mapped
    return tensor


def read_stage(model_path: str, stage_idx: int, num_stages: int) -> nn.Module | None:
    """Stage `stage_idx` of the checkpoint at `model_path` in float32 on the CPU, read tensor by tensor, or None
    when the checkpoint has no safetensors. Raises `ConfigError` when a tensor of the stage is missing or has
    the wrong shape."""
    files = tensor_files(model_path)
    if files is None:
        return None
    config = LlamaConfig.from_pretrained(model_path, local_files_only=True)
    config._attn_implementation = "sdpa"  # what from_pretrained picks (and llama_config sets) on torch >= 2.1
    module = stage_module(config, stage_idx, num_stages)
    k = config.num_hidden_layers // num_stages
    wanted = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    tied = stage_idx == 0 and bool(config.tie_word_embeddings)
    keys = {name: model_key(stage_idx, name, k) for name in wanted if not (tied and name == "lm_head.weight")}
    missing = sorted(key for key in keys.values() if key not in files)
    if missing:
        raise ConfigError(f"the checkpoint at {model_path} lacks stage {stage_idx}'s tensors {missing[:3]}")
    state: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        tensor = _read_tensor(files[key], key)
        if tuple(tensor.shape) != wanted[name]:
            raise ConfigError(f"the checkpoint at {model_path}: {key} has shape {tuple(tensor.shape)}, "
                              f"stage {stage_idx} expects {wanted[name]}")
        state[name] = tensor
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()
    module.load_state_dict(state, strict=True, assign=True)
    logger.debug("read stage %d from %s: %d tensors", stage_idx, model_path, len(state))
    return module
