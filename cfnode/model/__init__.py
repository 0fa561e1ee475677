"""Model layer: the seeded LLaMA and its pipeline stages (`cfnode.model.stages`), the embedded corpus and data
order (`cfnode.model.data`) and the tokenizer (`cfnode.model.tokenizer`).

The public model API (`split_llama`, `build_stage`, ...) is re-exported lazily so that importing the data or
tokenizer modules does not pay for importing transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("cfnode.model.stages"), name)
    raise AttributeError(f"module 'cfnode.model' has no attribute {name!r}")
