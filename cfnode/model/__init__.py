"""Model layer: the seeded LLaMA and its pipeline stages (see `cfnode.model.stages`)."""

from cfnode.model.stages import (
    PRETRAINED_MAX_SEQ_LEN,
    BlockStage,
    HeadStage,
    build_llama,
    build_stage,
    causal_mask,
    llama_config,
    load_pretrained,
    model_config_from_pretrained,
    split_llama,
    stage_param_count,
)

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
    "split_llama",
    "stage_param_count",
]
