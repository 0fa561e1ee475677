"""Unit tests of cfnode.model.stages: split parity with the unsplit LlamaForCausalLM, causality, stage shapes,
deterministic construction and local pretrained checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from cfnode.config import PRESETS, ModelConfig
from cfnode.errors import ConfigError
from cfnode.model import (
    BlockStage,
    HeadStage,
    build_llama,
    build_stage,
    llama_config,
    load_pretrained,
    model_config_from_pretrained,
    split_llama,
    stage_param_count,
)
from cfnode.model.checkpoint import read_stage

TINY = PRESETS["tiny"]


def tiny(**overrides: object) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def batch(cfg: ModelConfig, b: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference_loss(model: LlamaForCausalLM, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def pipeline_logits(stages: list[nn.Module], ids: torch.Tensor) -> torch.Tensor:
    head = stages[0]
    assert isinstance(head, HeadStage)
    hidden = head.embed(ids)
    for stage in stages[1:]:
        hidden = stage(hidden)
    return head.head(hidden)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.clone()
    return out


def reference_grads(cfg: ModelConfig, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model = build_llama(cfg)
    loss = reference_loss(model, ids, targets)
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("layers_per_stage", [1, 2])
def test_parity_with_unsplit_model(layers_per_stage: int) -> None:
    cfg = tiny(layers_per_stage=layers_per_stage)
    ids, targets = batch(cfg)
    ref_loss, ref_grads = reference_grads(cfg, ids, targets)

    model = build_llama(cfg)
    stages = split_llama(model, cfg.num_stages)
    assert len(stages) == cfg.num_stages + 1
    loss = HeadStage.loss(pipeline_logits(stages, ids), targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    got = grads(model)  # stages share parameters with `model`
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], msg=name)


@pytest.mark.parametrize("layers_per_stage", [1, 2])
def test_parity_with_detached_hops(layers_per_stage: int) -> None:
    """Each stage runs on a detached input, as it does across processes; backward is chained by hand."""
    cfg = tiny(layers_per_stage=layers_per_stage)
    ids, targets = batch(cfg, seed=3)
    ref_loss, ref_grads = reference_grads(cfg, ids, targets)

    # Standalone per-stage copies, like separate nodes have.
    stages = [build_stage(cfg, i) for i in range(cfg.num_stages + 1)]
    head = stages[0]
    assert isinstance(head, HeadStage)

    hidden = head.embed(ids)
    embed_out = hidden
    hops: list[tuple[torch.Tensor, torch.Tensor]] = []
    for stage in stages[1:]:
        x = hidden.detach().requires_grad_()
        hidden = stage(x)
        hops.append((x, hidden))
    final_in = hidden.detach().requires_grad_()
    loss = HeadStage.loss(head.head(final_in), targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)

    grad = final_in.grad
    for x, out in reversed(hops):
        torch.autograd.backward(out, grad)
        grad = x.grad
    torch.autograd.backward(embed_out, grad)

    k = cfg.layers_per_stage
    head_grads = grads(head)
    torch.testing.assert_close(head_grads["embed_tokens.weight"], ref_grads["model.embed_tokens.weight"])
    torch.testing.assert_close(head_grads["norm.weight"], ref_grads["model.norm.weight"])
    torch.testing.assert_close(head_grads["lm_head.weight"], ref_grads["lm_head.weight"])
    for s, stage in enumerate(stages[1:]):
        for name, g in grads(stage).items():
            _, local, rest = name.split(".", 2)
            ref_name = f"model.layers.{s * k + int(local)}.{rest}"
            torch.testing.assert_close(g, ref_grads[ref_name], msg=ref_name)
    n_checked = 3 + sum(len(list(st.parameters())) for st in stages[1:])
    assert n_checked == len(ref_grads)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causality(attn: str) -> None:
    """The explicit mask makes the stages causal even under eager attention (which ignores `is_causal`)."""
    cfg = tiny(layers_per_stage=2)
    model = build_llama(cfg)
    model.set_attn_implementation(attn)
    assert model.model.layers[0].self_attn.config._attn_implementation == attn
    stages = split_llama(model, cfg.num_stages)
    ids, _ = batch(cfg, b=2)
    t = cfg.seq_len // 2
    perturbed = ids.clone()
    perturbed[:, t:] = (perturbed[:, t:] + 1 + torch.arange(cfg.seq_len - t)) % cfg.vocab_size
    with torch.no_grad():
        a = pipeline_logits(stages, ids)
        b = pipeline_logits(stages, perturbed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])
    # Every later position changes (the perturbed token itself feeds it).
    assert ((a[:, t:] - b[:, t:]).abs().amax(dim=-1) > 1e-4).all()


def test_stage_state_dicts() -> None:
    cfg = tiny(layers_per_stage=2)
    stages = split_llama(build_llama(cfg), cfg.num_stages)
    head, blocks = stages[0], stages[1:]
    assert isinstance(head, HeadStage)
    assert all(isinstance(b, BlockStage) for b in blocks)
    assert sorted(head.state_dict()) == ["embed_tokens.weight", "lm_head.weight", "norm.weight"]
    assert isinstance(head.embed_tokens, nn.Embedding)
    assert isinstance(head.lm_head, nn.Linear) and head.lm_head.bias is None

    shapes = [{k: tuple(v.shape) for k, v in b.state_dict().items()} for b in blocks]
    assert all(s == shapes[0] for s in shapes[1:])
    keys = set(shapes[0])
    assert {k.split(".")[1] for k in keys} == {"0", "1"}
    assert all(k.startswith("layers.") for k in keys)
    assert not any("rotary" in k or "inv_freq" in k for k in keys)


def test_build_stage_deterministic_and_matches_split() -> None:
    cfg = tiny(layers_per_stage=2)
    rng_before = torch.random.get_rng_state()
    full = split_llama(build_llama(cfg), cfg.num_stages)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "build_llama must not disturb the global RNG"
    for i in range(cfg.num_stages + 1):
        a, b = build_stage(cfg, i), build_stage(cfg, i)
        sd_a, sd_b, sd_full = a.state_dict(), b.state_dict(), full[i].state_dict()
        assert sd_a.keys() == sd_full.keys()
        for k in sd_a:
            assert torch.equal(sd_a[k], sd_b[k]), k
            assert torch.equal(sd_a[k], sd_full[k]), k
            assert sd_a[k].dtype == torch.float32
        # A standalone copy: no storage shared with another build.
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters(), strict=True))

    other = build_stage(dataclasses.replace(cfg, init_seed=cfg.init_seed + 1), 1)
    assert not torch.equal(other.state_dict()["layers.0.mlp.up_proj.weight"],
                           full[1].state_dict()["layers.0.mlp.up_proj.weight"])
    with pytest.raises(ConfigError):
        build_stage(cfg, cfg.num_stages + 1)


def test_split_rejects_indivisible() -> None:
    model = build_llama(tiny(num_stages=3, layers_per_stage=1))
    with pytest.raises(ValueError, match="cannot split 3 decoder layers into 2"):
        split_llama(model, 2)


def test_llama_config_fields() -> None:
    cfg = tiny(num_kv_heads=2, rope_theta=5000.0)
    lc = llama_config(cfg)
    assert lc.num_hidden_layers == cfg.num_layers
    assert lc.num_key_value_heads == 2
    assert lc.max_position_embeddings >= cfg.seq_len
    assert lc.tie_word_embeddings is False
    rope = getattr(lc, "rope_parameters", None) or {"rope_theta": lc.rope_theta}
    assert rope["rope_theta"] == 5000.0


def test_gqa_parity() -> None:
    cfg = tiny(num_kv_heads=2)
    ids, targets = batch(cfg)
    ref_loss, _ = reference_grads(cfg, ids, targets)
    stages = split_llama(build_llama(cfg), cfg.num_stages)
    torch.testing.assert_close(HeadStage.loss(pipeline_logits(stages, ids), targets).detach(), ref_loss)


def test_pretrained_checkpoint(tmp_path) -> None:
    src_cfg = tiny(num_stages=4, layers_per_stage=1, init_seed=7)
    build_llama(src_cfg).save_pretrained(tmp_path)

    cfg = model_config_from_pretrained(str(tmp_path), num_stages=2)
    assert cfg.preset == "pretrained"
    assert (cfg.num_stages, cfg.layers_per_stage, cfg.num_layers) == (2, 2, 4)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads) == (
        src_cfg.vocab_size, src_cfg.hidden_size, src_cfg.num_heads)
    assert cfg.seq_len == min(src_cfg.seq_len, 128)

    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path), local_files_only=True, dtype=torch.float32)
    full = split_llama(loaded, cfg.num_stages)
    for i in range(cfg.num_stages + 1):
        stage = build_stage(cfg, i, model_path=str(tmp_path))
        sd, ref = stage.state_dict(), full[i].state_dict()
        assert sd.keys() == ref.keys()
        for k in sd:
            assert torch.equal(sd[k], ref[k]), (i, k)

    with pytest.raises(ConfigError, match="num_stages"):
        model_config_from_pretrained(str(tmp_path), num_stages=3)
    with pytest.raises(ConfigError, match="does not match"):
        build_stage(dataclasses.replace(cfg, hidden_size=128), 0, model_path=str(tmp_path))


def test_pretrained_tied_embeddings_are_untied(tmp_path) -> None:
    src = tiny(num_stages=2, layers_per_stage=1)
    lc = llama_config(src)
    lc.tie_word_embeddings = True
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(lc)
    model.save_pretrained(tmp_path)
    cfg = model_config_from_pretrained(str(tmp_path), num_stages=2)
    head = build_stage(cfg, 0, model_path=str(tmp_path))
    assert isinstance(head, HeadStage)
    assert head.lm_head.weight is not head.embed_tokens.weight
    torch.testing.assert_close(head.lm_head.weight, head.embed_tokens.weight)
    assert sorted(head.state_dict()) == ["embed_tokens.weight", "lm_head.weight", "norm.weight"]


def _stage_outputs_equal(cfg: ModelConfig, lean: nn.Module, whole: nn.Module, stage_idx: int) -> None:
    sd, ref = lean.state_dict(), whole.state_dict()
    assert sd.keys() == ref.keys()
    for k in sd:
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], ref[k]), (stage_idx, k)
    ids, _ = batch(cfg)
    with torch.no_grad():
        if stage_idx == 0:
            hidden = whole.embed(ids)
            assert torch.equal(lean.embed(ids), hidden) and torch.equal(lean.head(hidden), whole.head(hidden))
        else:
            hidden = torch.randn(2, cfg.seq_len, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
            assert torch.equal(lean(hidden), whole(hidden))


@pytest.mark.parametrize("layout", ["single", "sharded", "bfloat16"])
def test_stage_read_from_safetensors_equals_the_whole_model_cut(tmp_path, layout: str) -> None:
    """The lean build (only the stage's tensors, from one file or shards) gives the tensors and outputs of
    loading the whole checkpoint and cutting the stage out."""
    model = build_llama(tiny(num_stages=2, layers_per_stage=2, init_seed=5))
    if layout == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB" if layout == "sharded" else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    cfg = model_config_from_pretrained(str(tmp_path), num_stages=2)
    whole = split_llama(load_pretrained(str(tmp_path)), cfg.num_stages)
    for i in range(cfg.num_stages + 1):
        lean = read_stage(str(tmp_path), i, cfg.num_stages)
        assert lean is not None
        _stage_outputs_equal(cfg, lean, whole[i], i)


def test_stage_read_touches_only_its_own_tensors(tmp_path) -> None:
    """A checkpoint that holds nothing but stage 2's tensors still builds stage 2 (and only stage 2)."""
    cfg0 = tiny(num_stages=2, layers_per_stage=1, init_seed=9)
    model = build_llama(cfg0)
    model.save_pretrained(tmp_path)
    keep = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.1.")}
    save_file({k: v.contiguous() for k, v in keep.items()}, str(tmp_path / "model.safetensors"))
    cfg = model_config_from_pretrained(str(tmp_path), num_stages=2)
    stage = build_stage(cfg, 2, model_path=str(tmp_path))
    _stage_outputs_equal(cfg, stage, split_llama(model, 2)[2], 2)
    with pytest.raises(ConfigError, match="lacks stage 1's tensors"):
        build_stage(cfg, 1, model_path=str(tmp_path))


def test_a_bin_checkpoint_is_loaded_whole(tmp_path) -> None:
    model = build_llama(tiny(num_stages=2, layers_per_stage=1, init_seed=4))
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert read_stage(str(tmp_path), 1, 2) is None
    cfg = model_config_from_pretrained(str(tmp_path), num_stages=2)
    for i in range(3):
        _stage_outputs_equal(cfg, build_stage(cfg, i, model_path=str(tmp_path)), split_llama(model, 2)[i], i)


def test_param_counts() -> None:
    cfg = TINY
    stages = split_llama(build_llama(cfg), cfg.num_stages)
    d, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    assert stage_param_count(stages[0]) == 2 * v * d + d
    per_layer = 4 * d * d + 3 * d * f + 2 * d  # MHA (kv heads == heads), SwiGLU MLP, two norms
    assert stage_param_count(stages[1]) == cfg.layers_per_stage * per_layer
