"""cfnode/export.py and cfnode/generate.py without a swarm: naming, merging, gathering at one step, refusals,
the written checkpoint, generation."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

from cfnode.config import PRESETS, preset
from cfnode.errors import ConfigError
from cfnode.export import (
    EXPORT_INFO,
    ExportRefused,
    FetchedStage,
    annotate_rebuilds,
    check_out_dir,
    gather_stages,
    read_export_info,
    resolve_model,
    stage_owners,
    write_export,
)
from cfnode.model.stages import build_llama, merge_llama, model_key, split_llama
from cfnode.net.records import PeerRecord, StageRecord, StageState, SwarmView

TINY = preset("tiny")


def _states(cfg=TINY) -> dict[int, dict[str, torch.Tensor]]:
    return {i: {k: v.clone() for k, v in s.state_dict().items()}
            for i, s in enumerate(split_llama(build_llama(cfg), cfg.num_stages))}


def test_model_key_reverses_split_llama_naming() -> None:
    assert model_key(0, "embed_tokens.weight", 2) == "model.embed_tokens.weight"
    assert model_key(0, "norm.weight", 2) == "model.norm.weight"
    assert model_key(0, "lm_head.weight", 2) == "lm_head.weight"
    assert model_key(3, "layers.1.mlp.up_proj.weight", 2) == "model.layers.5.mlp.up_proj.weight"
    with pytest.raises(ValueError):
        model_key(1, "layers.2.mlp.up_proj.weight", 2)


def test_merge_llama_equals_the_model_and_shares_the_tensors() -> None:
    cfg = preset("tiny", num_stages=1, layers_per_stage=3)  # several layers per stage
    model = build_llama(cfg)
    states = {i: {k: v.clone() for k, v in s.state_dict().items()} for i, s in enumerate(split_llama(model, 1))}
    merged = merge_llama(cfg, states)
    assert merged.model.layers[2].mlp.down_proj.weight.data_ptr() == states[1]["layers.2.mlp.down_proj.weight"].data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"stages 0\.\.1"):
        merge_llama(cfg, {0: states[0]})
    bad = dict(states[1])
    bad.pop("layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="missing"):
        merge_llama(cfg, {0: states[0], 1: bad})


def _fake_fetch(steps: dict[int, list[int]], calls: list[int]):
    async def fetch(idx: int) -> FetchedStage:
        calls.append(idx)
        seq = steps[idx]
        step = seq.pop(0) if len(seq) > 1 else seq[0]
        return FetchedStage(stage=idx, step=step, generation=1, state={})
    return fetch


def test_gather_fetches_again_the_stages_behind_until_all_agree() -> None:
    calls: list[int] = []
    fetch = _fake_fetch({0: [5, 6], 1: [6], 2: [5, 6], 3: [6]}, calls)
    got = asyncio.run(gather_stages(3, fetch, backoff_s=0))
    assert {f.step for f in got.values()} == {6}
    assert calls == [0, 1, 2, 3, 0, 2]


def test_gather_with_a_pinned_stage0_waits_for_its_step_and_refuses_a_stage_past_it() -> None:
    local = FetchedStage(stage=0, step=6, generation=1, state={})
    calls: list[int] = []
    got = asyncio.run(gather_stages(2, _fake_fetch({1: [5, 6], 2: [6]}, calls), local=local, backoff_s=0))
    assert calls == [1, 2, 1] and got[0] is local
    with pytest.raises(ExportRefused, match="past stage 0"):
        asyncio.run(gather_stages(2, _fake_fetch({1: [7], 2: [6]}, []), local=local, backoff_s=0))


def test_gather_gives_up_on_stages_that_never_agree() -> None:
    counter = iter(range(10**6))

    async def fetch(idx: int) -> FetchedStage:
        return FetchedStage(stage=idx, step=next(counter), generation=1, state={})

    with pytest.raises(ExportRefused, match="never agreed"):
        asyncio.run(gather_stages(2, fetch, rounds=3, backoff_s=0))


def _view(states: dict[int, StageState]) -> SwarmView:
    return SwarmView(stages={i: (PeerRecord(peer_id=f"peer{i}", record=StageRecord(state=s, generation=2), expiration_time=1e12),)
                             for i, s in states.items()}, now=0.0)


def test_stage_owners_refuses_a_missing_or_recovering_stage() -> None:
    online = {i: StageState.ONLINE for i in range(4)}
    assert stage_owners(_view(online), 3) == {i: f"peer{i}" for i in range(4)}
    with pytest.raises(ExportRefused, match="stage 2 is being rebuilt"):
        stage_owners(_view({**online, 2: StageState.RECOVERING}), 3)
    with pytest.raises(ExportRefused, match="stage 3 has no ONLINE node"):
        stage_owners(_view({i: online[i] for i in range(3)}), 3)
    assert stage_owners(_view({**online, 0: StageState.OFFLINE}), 3, skip=(0,)) == {i: f"peer{i}" for i in (1, 2, 3)}


def test_resolve_model_finds_the_preset_by_the_runs_hash_and_refuses_a_mismatch() -> None:
    run = preset("small", num_stages=2)
    assert resolve_model(run.config_hash(), 2) == run
    assert resolve_model(run.config_hash(), 2, preset_name="small") == run
    with pytest.raises(ConfigError, match="config hash"):
        resolve_model(run.config_hash(), 2, preset_name="tiny")
    with pytest.raises(ConfigError, match="none of the presets"):
        resolve_model("0" * 16, 2)


def test_check_out_dir_refuses_a_directory_that_is_not_an_export(tmp_path) -> None:
    check_out_dir(str(tmp_path / "absent"))
    check_out_dir(str(tmp_path))  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a cfnode export"):
        check_out_dir(str(tmp_path))


def test_write_export_loads_with_transformers_and_replaces_an_earlier_export(tmp_path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfnode.model.tokenizer import load_tokenizer, tokenizer_hash

    states = _states()
    stages = {i: FetchedStage(stage=i, step=7, generation=1 + (i == 2), state=s, peer_id=f"p{i}")
              for i, s in states.items()}
    out = str(tmp_path / "model")
    write_export(out, TINY, stages, run_id="r", data_seed=3)
    (tmp_path / "model" / "stale.txt").write_text("from an earlier export")
    info = write_export(out, TINY, stages, run_id="r", data_seed=3)
    assert not os.path.exists(os.path.join(out, "stale.txt"))
    assert info == read_export_info(out)
    assert info["step"] == 7 and info["config_hash"] == TINY.config_hash() and info["data_seed"] == 3
    assert [s["generation"] for s in info["stages"]] == [1, 1, 2, 1]
    annotate_rebuilds(out, {2: "grad-avg"})
    assert [s["rebuilt"] for s in read_export_info(out)["stages"]] == [None, None, "grad-avg", None]

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    reference = merge_llama(TINY, _states())
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.seq_len))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "ROMEO. <|endoftext|>JULIET."
    assert tok(text)["input_ids"] == load_tokenizer().encode(text).ids
    assert tok.eos_token_id == model.config.eos_token_id == 0
    assert tokenizer_hash(Tokenizer.from_file(os.path.join(out, "tokenizer.json"))) == tokenizer_hash(load_tokenizer())

    with pytest.raises(ExportRefused, match="one step"):
        write_export(out, TINY, {**stages, 1: FetchedStage(stage=1, step=6, generation=1, state=states[1])},
                     run_id="r")


def test_an_export_resumes_as_the_same_model_config(tmp_path) -> None:
    from cfnode.model.stages import model_config_from_pretrained

    out = str(tmp_path / "model")
    write_export(out, TINY, {i: FetchedStage(stage=i, step=1, generation=1, state=s) for i, s in _states().items()},
                 run_id="r")
    assert model_config_from_pretrained(out, TINY.num_stages).config_hash() == TINY.config_hash()
    assert json.load(open(os.path.join(out, EXPORT_INFO)))["model"]["num_stages"] == TINY.num_stages


def test_generate_is_deterministic_per_seed_and_rejects_bad_input(tmp_path) -> None:
    from cfnode.generate import GenerateOptions, generate_text, load_model

    out = str(tmp_path / "model")
    write_export(out, TINY, {i: FetchedStage(stage=i, step=1, generation=1, state=s) for i, s in _states().items()},
                 run_id="r")
    loaded = load_model(out)
    texts = [generate_text(GenerateOptions(model_dir=out, prompt="ROMEO.", max_new_tokens=12, seed=s), loaded)
             for s in (1, 1, 2)]
    assert texts[0].startswith("ROMEO.") and texts[0] == texts[1] != texts[2]
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        GenerateOptions(model_dir=out, prompt="x", max_new_tokens=0)
    with pytest.raises(ConfigError, match="not a directory"):
        GenerateOptions(model_dir=str(tmp_path / "absent"), prompt="x")
    with pytest.raises(ConfigError, match="not a loadable checkpoint"):
        load_model(str(tmp_path))


def test_presets_have_distinct_hashes() -> None:  # resolve_model's auto-detection relies on it
    hashes = [p.config_hash() for p in PRESETS.values()]
    assert len(set(hashes)) == len(hashes)
