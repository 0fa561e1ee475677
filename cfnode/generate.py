"""`cfnode generate`: plain transformers generation from an exported checkpoint (a thin wrapper).

Nothing here touches the swarm: the checkpoint is loaded with `AutoModelForCausalLM` / `AutoTokenizer` from the
local directory only (never the hub). Sampling is seeded: the same model, prompt and settings give the same text.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cfnode.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    model_dir: str
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 means greedy decoding."""
    top_k: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not os.path.isdir(self.model_dir):
            raise ConfigError(f"--model {self.model_dir} is not a directory")


def load_model(model_dir: str) -> tuple[object, object]:
    """(model in eval mode, tokenizer) from a local checkpoint directory; ConfigError (one line) if it is not one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(f"--model {model_dir} is not a loadable checkpoint: {reason}") from None
    model.eval()
    return model, tokenizer


def generate_text(options: GenerateOptions, loaded: tuple[object, object] | None = None) -> str:
    """The prompt followed by up to `max_new_tokens` generated tokens, decoded. The end-of-text token (the
    document separator the run trained on) is put in front of the prompt when the tokenizer does not add a
    bos itself, so the prompt reads as the start of a document."""
    import torch

    model, tokenizer = loaded if loaded is not None else load_model(options.model_dir)
    ids = tokenizer(options.prompt, add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    bos = getattr(model.config, "bos_token_id", None)  # type: ignore[attr-defined]
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if not ids:
        raise ConfigError("--prompt is empty and the tokenizer has no bos token to start from")
    input_ids = torch.tensor([ids], dtype=torch.long)
    sample = options.temperature > 0
    kwargs: dict[str, object] = {"do_sample": sample, "max_new_tokens": options.max_new_tokens,
                                 "attention_mask": torch.ones_like(input_ids)}
    if sample:
        kwargs.update(temperature=options.temperature, top_k=options.top_k or None)
    eos = getattr(model.config, "eos_token_id", None)  # type: ignore[attr-defined]
    if eos is not None:
        kwargs["pad_token_id"] = eos
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(options.seed)
        out = model.generate(input_ids, **kwargs)  # type: ignore[attr-defined]
    start = 1 if bos is not None and ids[0] == bos else 0  # the bos in front is not part of the prompt's text
    return tokenizer.decode(out[0][start:], skip_special_tokens=True)  # type: ignore[attr-defined]
