"""The model layer: building a seeded (or locally pretrained) LLaMA and cutting it into pipeline stages.

This module owns everything that turns a `ModelConfig` into `nn.Module`s:

* `llama_config` / `build_llama` / `load_pretrained`: the full `transformers` `LlamaForCausalLM`, float32, with
  weights that are a pure function of `ModelConfig.init_seed` (or read from a local checkpoint, never the hub).
* `HeadStage` (stage 0: embedding, final norm, LM head and loss) and `BlockStage` (stages 1..L: `k` decoder layers
  with stage-local names `layers.0 .. layers.{k-1}`, so every transformer stage has the same state_dict keys).
* `split_llama` (stages sharing parameters with the full model) and `build_stage` (a standalone copy of one stage;
  from a checkpoint it reads only that stage's tensors, see `checkpoint.py`).
* `model_config_from_pretrained`: a `ModelConfig` describing a local checkpoint.

The blocks come from `transformers` (no hand-written attention). `BlockStage` always passes an explicit additive
causal mask, because a standalone `LlamaDecoderLayer` given `attention_mask=None` is not causal under every
attention implementation. No networking here; this module must not import hivemind.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from cfnode.config import ModelConfig
from cfnode.errors import ConfigError

__all__ = [
    "PRETRAINED_MAX_SEQ_LEN",
    "BlockStage",
    "HeadStage",
    "build_llama",
    "build_stage",
    "causal_mask",
    "llama_config",
    "load_pretrained",
    "model_config_from_pretrained",
    "place_stage",
    "split_llama",
    "stage_param_count",
]

PRETRAINED_MAX_SEQ_LEN = 128
"""Default `seq_len` of a `ModelConfig` read from a checkpoint: min(max_position_embeddings, this)."""

# `from_pretrained` takes `dtype` in transformers 5 (`torch_dtype` warns there); 4.x needs `torch_dtype`.
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def llama_config(cfg: ModelConfig) -> LlamaConfig:
    """The `LlamaConfig` of the full (unsplit) model described by `cfg`: untied, no dropout, SDPA attention."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_llama(cfg: ModelConfig) -> LlamaForCausalLM:
    """The full model in float32 with weights that depend only on `cfg` (seeded by `cfg.init_seed`).

    The initialisation runs under `torch.random.fork_rng`, so the caller's global RNG state is left untouched.
    """
    config = llama_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def load_pretrained(model_path: str) -> LlamaForCausalLM:
    """Load a local checkpoint directory (never the hub) in float32.

    Tied word embeddings are untied by cloning the embedding into the LM head: stage 0 trains the two as
    independent parameters (every stage-0 state_dict then has the same keys, tied or not).
    """
    model = LlamaForCausalLM.from_pretrained(model_path, local_files_only=True, **{_DTYPE_KWARG: torch.float32})
    model = model.to(torch.float32)
    if model.lm_head.weight is model.model.embed_tokens.weight or model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def causal_mask(batch: int, seq_len: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """Additive causal mask (batch, 1, T, T): 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None].expand(batch, 1, seq_len, seq_len)


class HeadStage(nn.Module):
    """Stage 0: token embedding in, final norm + LM head + loss out.

    Built from existing modules (then it shares their parameters) or, when they are omitted, from fresh ones
    shaped after `config` (uninitialised weights; load a state_dict into them).
    """

    def __init__(
        self,
        config: LlamaConfig,
        embed_tokens: nn.Embedding | None = None,
        norm: LlamaRMSNorm | None = None,
        lm_head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding = embed_tokens if embed_tokens is not None else nn.Embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id)
        self.norm: LlamaRMSNorm = norm if norm is not None else LlamaRMSNorm(
            config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head: nn.Linear = lm_head if lm_head is not None else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, d)."""
        return self.embed_tokens(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) -> logits (B, T, V) = lm_head(norm(hidden))."""
        return self.lm_head(self.norm(hidden))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all B*T tokens, in float32 (targets equal to -100 are ignored)."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Same as `embed` (stage 0's first hop)."""
        return self.embed(ids)


class BlockStage(nn.Module):
    """A transformer stage: `k` LLaMA decoder layers named `layers.0 .. layers.{k-1}`.

    Every transformer stage of one model has identical state_dict keys and shapes. The rotary embedding's
    `inv_freq` is a non-persistent buffer, so it is not part of the state_dict. No KV cache is used.
    """

    def __init__(self, config: LlamaConfig, layers: Iterable[LlamaDecoderLayer] | int) -> None:
        """`layers`: existing decoder layers (shared, not copied), or a count of fresh ones to create."""
        super().__init__()
        if isinstance(layers, int):
            layers = [LlamaDecoderLayer(config, layer_idx=i) for i in range(layers)]
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("a BlockStage needs at least one decoder layer")
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) -> hidden states (B, T, d), causal over positions 0..T-1."""
        batch, seq_len, _ = hidden.shape
        position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0).expand(batch, seq_len)
        mask = causal_mask(batch, seq_len, hidden.dtype, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=False,
            )
            # transformers >= 4.54 returns a tensor; older versions return a tuple (hidden, ...).
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def split_llama(model: LlamaForCausalLM, num_stages: int) -> list[nn.Module]:
    """Cut `model` into `[HeadStage, BlockStage 1, ..., BlockStage num_stages]`.

    The stages SHARE parameters with `model` (no copy): training a stage trains the model and vice versa.
    `stage0.embed(ids)`, then each `stage_i(hidden)`, then `stage0.head(hidden)` reproduce the model's logits.
    """
    num_layers = model.config.num_hidden_layers
    if num_stages < 1 or num_layers % num_stages:
        raise ValueError(
            f"cannot split {num_layers} decoder layers into {num_stages} transformer stages: "
            f"the number of layers must be a positive multiple of the number of stages")
    k = num_layers // num_stages
    inner = model.model
    stages: list[nn.Module] = [HeadStage(model.config, inner.embed_tokens, inner.norm, model.lm_head)]
    for s in range(num_stages):
        stages.append(BlockStage(model.config, list(inner.layers[s * k:(s + 1) * k])))
    return stages


def _check_matches(cfg: ModelConfig, found: ModelConfig, model_path: str) -> None:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_stages",
            "layers_per_stage")
    diff = [f"{k}={getattr(cfg, k)} (checkpoint: {getattr(found, k)})"
            for k in keys if getattr(cfg, k) != getattr(found, k)]
    if diff:
        raise ConfigError(f"model config does not match the checkpoint at {model_path}: {', '.join(diff)}")


def build_stage(cfg: ModelConfig, stage_idx: int, model_path: str | None = None, *,
                device: str | torch.device | None = None) -> nn.Module:
    """A standalone stage `stage_idx` of the model.

    Without `model_path` the full model is `build_llama(cfg)` and the stage is cut from it, so every node derives
    the same weights from the seed. With `model_path` (a local checkpoint directory) only the stage's own tensors
    are read from its safetensors (`checkpoint.read_stage`; a `.bin` checkpoint is loaded whole); `cfg` must
    describe the checkpoint (see `model_config_from_pretrained`) or a `ConfigError` is raised.

    The weights are always made on the CPU in float32 (the same bits on every machine), then the stage is
    moved to `device` (`place_stage`); they stay float32 whatever the compute dtype (StageWorker autocasts).
    """
    if not 0 <= stage_idx <= cfg.num_stages:
        raise ConfigError(f"stage index must be in 0..{cfg.num_stages}, got {stage_idx}")
    if model_path is None:
        stage = cut_stage(build_llama(cfg), cfg.num_stages, stage_idx)
    else:
        from cfnode.model.checkpoint import read_stage  # it builds on this module's stage classes

        _check_matches(cfg, model_config_from_pretrained(model_path, cfg.num_stages), model_path)
        stage = read_stage(model_path, stage_idx, cfg.num_stages)
        if stage is None:  # no safetensors: a .bin checkpoint is read whole
            stage = cut_stage(load_pretrained(model_path), cfg.num_stages, stage_idx)
    return stage if device is None else place_stage(stage, device)


def cut_stage(model: LlamaForCausalLM, num_stages: int, stage_idx: int) -> nn.Module:
    """A standalone (deep-copied) stage of a full model; the model can be freed afterwards."""
    return copy.deepcopy(split_llama(model, num_stages)[stage_idx])


def place_stage(stage: nn.Module, device: str | torch.device) -> nn.Module:
    """Move every parameter and buffer of `stage` to `device`, in place (dtypes unchanged). Returns `stage`."""
    target = torch.device(device)
    if any(t.device != target for t in (*stage.parameters(), *stage.buffers())):
        stage.to(target)
    return stage


def empty_stage(cfg: ModelConfig, stage_idx: int) -> nn.Module:
    """An uninitialised stage module of the right shape (load a state_dict into it): a shadow copy's module."""
    config = llama_config(cfg)
    return HeadStage(config) if stage_idx == 0 else BlockStage(config, cfg.layers_per_stage)


@functools.lru_cache(maxsize=8)
def stage_shapes(cfg: ModelConfig, stage_idx: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a stage's state_dict (what a replica of it must look like), without allocating."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in empty_stage(cfg, stage_idx).state_dict().items()}


def model_config_from_pretrained(model_path: str, num_stages: int, seq_len: int | None = None) -> ModelConfig:
    """A `ModelConfig` (preset "pretrained") describing the local checkpoint at `model_path`.

    `seq_len` defaults to min(max_position_embeddings, PRETRAINED_MAX_SEQ_LEN). Tied embeddings are accepted
    (`load_pretrained` unties them). Settings a `ModelConfig` cannot express (RoPE scaling, a non-default
    head_dim, biases) are taken from the checkpoint itself when the weights are loaded.
    Raises `ConfigError` if the decoder layers cannot be split evenly into `num_stages` stages.
    """
    config = LlamaConfig.from_pretrained(model_path, local_files_only=True)
    num_layers = config.num_hidden_layers
    if num_stages < 1 or num_layers % num_stages:
        raise ConfigError(
            f"model.num_stages: the checkpoint at {model_path} has {num_layers} decoder layers, "
            f"which cannot be split evenly into {num_stages} transformer stages")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return ModelConfig(
        preset="pretrained",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        num_stages=num_stages,
        layers_per_stage=num_layers // num_stages,
        seq_len=seq_len if seq_len is not None else min(config.max_position_embeddings, PRETRAINED_MAX_SEQ_LEN),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope_theta),
    )


def stage_param_count(module: nn.Module) -> int:
    """Number of distinct parameter elements of `module`."""
    return sum(p.numel() for p in module.parameters())


def model_key(stage_idx: int, name: str, layers_per_stage: int) -> str:
    """The `LlamaForCausalLM` state_dict key of stage `stage_idx`'s tensor `name` (the reverse of
    `split_llama`'s naming): stage 0's `embed_tokens.*`/`norm.*` live under `model.`, `lm_head.*` stays; stage
    s >= 1's `layers.j.*` is decoder layer `(s - 1) * layers_per_stage + j`."""
    if stage_idx == 0:
        return name if name.startswith("lm_head.") else f"model.{name}"
    head, sep, rest = name.partition(".")
    index, sep2, tail = rest.partition(".")
    if head != "layers" or not sep or not sep2 or not index.isdigit() or int(index) >= layers_per_stage:
        raise ValueError(f"{name!r} is not a tensor of a {layers_per_stage}-layer transformer stage")
    return f"model.layers.{(stage_idx - 1) * layers_per_stage + int(index)}.{tail}"


def empty_llama(cfg: ModelConfig, config: LlamaConfig | None = None) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` whose parameters are on the meta device (no memory): fill it with `merge_stage`.
    Its rotary embedding's (non-persistent) `inv_freq` is computed on the CPU."""
    config = config if config is not None else llama_config(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    return model


def merge_stage(model: LlamaForCausalLM, cfg: ModelConfig, stage_idx: int,
                state: dict[str, torch.Tensor]) -> None:
    """Install stage `stage_idx`'s state_dict into `model` (from `empty_llama`) WITHOUT copying: the model's
    parameters become `state`'s tensors (so merging every stage holds the weights once). The stage's keys must
    be exactly those of `stage_shapes(cfg, stage_idx)`, with those shapes."""
    expected = stage_shapes(cfg, stage_idx)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"stage {stage_idx}: tensors do not match the model (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"stage {stage_idx}: {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
    mapped = {model_key(stage_idx, name, cfg.layers_per_stage): t.detach().float() for name, t in state.items()}
    result = model.load_state_dict(mapped, strict=False, assign=True)
    if result.unexpected_keys:  # pragma: no cover - guarded by the key check above
        raise ValueError(f"stage {stage_idx}: unexpected keys {result.unexpected_keys[:3]}")


def merge_llama(cfg: ModelConfig, states: dict[int, dict[str, torch.Tensor]]) -> LlamaForCausalLM:
    """The full model from every stage's state_dict (0..num_stages), sharing their tensors (the reverse of
    `split_llama`)."""
    if sorted(states) != list(range(cfg.num_stages + 1)):
        raise ValueError(f"need stages 0..{cfg.num_stages}, got {sorted(states)}")
    model = empty_llama(cfg)
    for idx, state in states.items():
        merge_stage(model, cfg, idx, state)
    return model
