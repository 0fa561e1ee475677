"""`--device` and `--compute-dtype` (cfnode/device.py): device resolution, placement (checked on the CPU and on
torch's shape-only `meta` device, so no GPU is needed), the worker's CPU boundary, bfloat16 parity with
transformers' LlamaForCausalLM, float16's static loss scale, and the run-wide meta field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cfnode.config import NodeConfig, TrainConfig, preset
from cfnode.device import FLOAT16_LOSS_SCALE, loss_scale, parse_device, resolve_device, torch_dtype
from cfnode.errors import ConfigError
from cfnode.model.stages import build_llama, build_stage, model_key, place_stage
from cfnode.net.records import MetaRecord
from cfnode.node.claim import _meta_record, meta_mismatch
from cfnode.train.schedule import AttemptKey
from cfnode.train.worker import NonFiniteGradient, StageWorker

CFG = preset("tiny")
NONE = {"cuda_available": False, "cuda_count": 0, "mps_available": False}
TWO_GPUS = {"cuda_available": True, "cuda_count": 2, "mps_available": False}
MAC = {"cuda_available": False, "cuda_count": 0, "mps_available": True}

# -- resolution --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "machine", "expected"), [
    ("cpu", NONE, "cpu"), ("cpu", TWO_GPUS, "cpu"), ("CPU", MAC, "cpu"), ("meta", NONE, "meta"),
    ("auto", NONE, "cpu"), ("auto", MAC, "mps"), ("auto", TWO_GPUS, "cuda:0"),
    ("auto", {**TWO_GPUS, "mps_available": True}, "cuda:0"),
    ("cuda", TWO_GPUS, "cuda:0"), ("cuda:1", TWO_GPUS, "cuda:1"), (" cuda:01 ", TWO_GPUS, "cuda:1"),
    ("mps", MAC, "mps"),
])
def test_resolve_device(requested: str, machine: dict[str, object], expected: str) -> None:
    assert resolve_device(requested, **machine) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("requested", "machine", "needle"), [
    ("cuda", NONE, "CUDA is not available"), ("cuda:0", MAC, "CUDA is not available"),
    ("cuda:2", TWO_GPUS, "2 CUDA device"), ("cuda:7", TWO_GPUS, "cuda:0..cuda:1"),
    ("mps", TWO_GPUS, "MPS"),
])
def test_an_absent_device_is_a_one_line_error_naming_the_flag(requested: str, machine: dict[str, object],
                                                              needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_device(requested, **machine)  # type: ignore[arg-type]
    text = str(err.value)
    assert text.startswith("--device ") and needle in text and "\n" not in text, text
    assert err.value.exit_code == 2


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:0:1", "", "tpu", "mps:0", "xla"])
def test_bad_device_strings_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^--device must be one of") as err:
        parse_device(bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(bad, **TWO_GPUS)  # type: ignore[arg-type]


def test_train_config_holds_a_concrete_device_and_a_known_dtype() -> None:
    assert (TrainConfig().device, TrainConfig().compute_dtype) == ("cpu", "float32")
    assert TrainConfig(device="cuda:1", compute_dtype="bfloat16").device == "cuda:1"
    for bad in ("auto", "cuda", "gpu"):
        with pytest.raises(ConfigError, match="device"):
            TrainConfig(device=bad)
    with pytest.raises(ConfigError, match="--compute-dtype"):
        TrainConfig(compute_dtype="int8")


def test_loss_scale_is_static_and_only_for_float16() -> None:
    assert loss_scale("float32") == loss_scale("bfloat16") == 1.0
    assert loss_scale("float16") == loss_scale(torch.float16) == FLOAT16_LOSS_SCALE == 2.0 ** 10
    assert torch_dtype("bfloat16") is torch.bfloat16


# -- placement -----------------------------------------------------------------------------------------------


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


@pytest.mark.parametrize("stage_idx", [0, 1])
def test_build_stage_places_every_parameter_and_buffer(stage_idx: int) -> None:
    cpu = build_stage(CFG, stage_idx)
    meta = build_stage(CFG, stage_idx, device="meta")
    assert all(t.device.type == "cpu" for t in _tensors(cpu))
    assert _tensors(meta) and all(t.device.type == "meta" for t in _tensors(meta))
    assert [(t.shape, t.dtype) for t in _tensors(meta)] == [(t.shape, t.dtype) for t in _tensors(cpu)]
    assert all(t.dtype == torch.float32 for t in meta.parameters())  # master weights stay float32
    assert place_stage(cpu, "cpu") is cpu


def test_worker_moves_its_module_and_knows_its_device() -> None:
    module = build_stage(CFG, 1)
    worker = StageWorker(module, stage_idx=1, lr=1e-3, clip_norm=1.0, device="meta")
    assert worker.device == torch.device("meta") and worker.module is module
    assert all(t.device.type == "meta" for t in _tensors(module))
    assert StageWorker(build_stage(CFG, 1, device="meta"), stage_idx=1, lr=1e-3,
                       clip_norm=1.0).device == torch.device("meta")  # default: where the module is
    shadow = build_stage(CFG, 2)
    worker.shadow_module = shadow  # `redundant`: the successor's copy computes here too
    assert all(t.device.type == "meta" for t in _tensors(shadow))


def test_worker_for_train_takes_device_and_dtype_from_the_config() -> None:
    train = TrainConfig(device="meta", compute_dtype="float16", lr=2e-3, clip_norm=0.5)
    worker = StageWorker.for_train(build_stage(CFG, 1), stage_idx=1, train=train)
    assert (worker.device.type, worker.compute_dtype, worker.lr, worker.clip_norm) == ("meta", torch.float16,
                                                                                        2e-3, 0.5)
    assert worker.loss_scale == FLOAT16_LOSS_SCALE


def _pipeline(compute_dtype: str, *, clip_norm: float = 1e9, lr: float = 1e-3) -> list[StageWorker]:
    return [StageWorker(build_stage(CFG, i), stage_idx=i, lr=lr, clip_norm=clip_norm, compute_dtype=compute_dtype)
            for i in range(CFG.num_stages + 1)]


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return batch[:, :-1], batch[:, 1:]


def _one_microbatch(workers: list[StageWorker], key: AttemptKey) -> tuple[float, list[torch.Tensor]]:
    """embed -> blocks -> head -> back, as tests/support/reference.py runs it; returns the loss and every tensor
    that crossed between stages (what the node would put on the wire)."""
    ids, targets = _batch()
    for w in workers:
        w.begin(key)
    crossed = [workers[0].embed(key, 0, ids)]
    for w in workers[1:]:
        crossed.append(w.forward(key, 0, crossed[-1]))
    loss, grad = workers[0].head_backward(key, 0, crossed[-1], targets, 1)
    crossed.append(grad)
    for w in reversed(workers[1:]):
        grad = w.backward(key, 0, grad)
        crossed.append(grad)
    workers[0].embed_backward(key, 0, grad)
    return loss, crossed


def test_bfloat16_keeps_the_wire_and_state_copies_float32_on_the_cpu() -> None:
    workers = _pipeline("bfloat16")
    key = AttemptKey(0, 1)
    _, crossed = _one_microbatch(workers, key)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in crossed)
    for w in workers:
        w.commit(key, 1)
        assert all(t.dtype == torch.float32 for t in w.module.parameters())  # float32 master weights
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in w.snapshot().values())
        meta, tensors = w.export_state()
        assert meta["step"] == 1 and all(t.device.type == "cpu" for t in tensors.values())


def test_bfloat16_step_matches_llama_for_causal_lm_under_the_same_autocast() -> None:
    """One training step of the cfnode stages (embed -> blocks -> head, hop by hop, as the reference does) and of
    transformers' LlamaForCausalLM with the same weights, both under torch.autocast(cpu, bfloat16).

    Measured on torch 2.13 / transformers 5.24 (CPU): the loss, every gradient and every updated weight are
    bit-identical (difference 0.0). The test allows a relative 1e-4 on gradients, 1e-6 on the loss and 2*lr on
    the weights after Adam's first step (whose update is lr * sign(g)) to tolerate kernel changes; a missing
    autocast on either side is 100x outside that (bfloat16 vs float32 gradients differ by ~1e-2 relative)."""
    lr = 1e-3
    workers = _pipeline("bfloat16", lr=lr)
    key = AttemptKey(0, 1)
    loss, _ = _one_microbatch(workers, key)
    for w in workers:
        w.prepare(key, 1)
    model = build_llama(CFG)
    ids, targets = _batch()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    ref = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    ref.backward()
    assert abs(loss - float(ref.detach())) <= 1e-6 * abs(float(ref.detach()))
    params = dict(model.named_parameters())
    pairs = [(p, params[model_key(i, n, CFG.layers_per_stage)]) for i, w in enumerate(workers)
             for n, p in w.module.named_parameters()]
    assert len(pairs) == len(params)
    for ours, theirs in pairs:
        assert theirs.grad is not None and ours.grad is not None
        assert float((ours.grad - theirs.grad).norm()) <= 1e-4 * float(theirs.grad.norm())
    torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0).step()
    for w in workers:
        w.apply(key)
    for ours, theirs in pairs:
        assert torch.allclose(ours.detach(), theirs.detach(), rtol=0, atol=2 * lr)


def test_float32_default_is_the_plain_float32_pass() -> None:
    """The default (float32, cpu) enters no autocast: the same bits as a worker built without the new options."""
    a = [StageWorker(build_stage(CFG, i), stage_idx=i, lr=1e-3, clip_norm=1.0) for i in range(CFG.num_stages + 1)]
    b = _pipeline("float32", clip_norm=1.0)
    key = AttemptKey(0, 1)
    la, ca = _one_microbatch(a, key)
    lb, cb = _one_microbatch(b, key)
    assert la == lb and all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True))


# -- float16: a static, run-wide loss scale ------------------------------------------------------------------


def test_float16_scales_the_loss_at_the_head_and_every_stage_unscales_before_clipping() -> None:
    scaled = _pipeline("float16")
    unscaled = _pipeline("float16")
    for w in unscaled:
        w.loss_scale = 1.0
    key = AttemptKey(0, 1)
    loss_s, crossed_s = _one_microbatch(scaled, key)
    loss_u, crossed_u = _one_microbatch(unscaled, key)
    assert loss_s == loss_u  # the reported loss is never scaled
    head_grad_s, head_grad_u = crossed_s[CFG.num_stages + 1], crossed_u[CFG.num_stages + 1]
    # the wire carries the scaled gradient (not bit-equal: unscaled, float16's subnormals lose precision)
    assert float((head_grad_s - head_grad_u * FLOAT16_LOSS_SCALE).norm()) <= 2e-2 * float(head_grad_s.norm())
    for ws, wu in zip(scaled, unscaled, strict=True):
        norm_s, _ = ws.prepare(key, 1)
        norm_u, _ = wu.prepare(key, 1)
        assert norm_s == pytest.approx(norm_u, rel=2e-2)  # unscaled before clipping (scaling avoids underflow)
        assert ws.prepare(key, 1)[0] == norm_s  # asked again: the same answer, the gradient is not unscaled twice
        grads = [p.grad for p in ws.module.parameters() if p.grad is not None]
        assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) == pytest.approx(norm_s)


def test_float16_overflow_is_a_non_finite_gradient_that_the_swarm_skips() -> None:
    workers = _pipeline("float16")
    workers[0].loss_scale = 2.0 ** 40  # past float16's range: the backward overflows
    for w in workers[1:]:
        w.loss_scale = 2.0 ** 40
    key = AttemptKey(0, 1)
    _one_microbatch(workers, key)
    with pytest.raises(NonFiniteGradient):
        workers[1].prepare(key, 1)
    workers[1].apply(key, skip=True)
    assert workers[1].step == 1 and workers[1].updates == 0


def test_float16_group_vector_is_unscaled() -> None:
    scaled, unscaled = _pipeline("float16"), _pipeline("float16")
    for w in unscaled:
        w.loss_scale = 1.0
    key = AttemptKey(0, 1)
    _one_microbatch(scaled, key)
    _one_microbatch(unscaled, key)
    vs, vu = scaled[2].gradient_vector(key, 1), unscaled[2].gradient_vector(key, 1)
    assert vs.dtype == torch.float64 and vs.device.type == "cpu"
    assert float((vs - vu).norm()) <= 2e-2 * float(vu.norm())


# -- run-wide: the compute dtype is in the run's meta ----------------------------------------------------------


def test_meta_record_carries_the_compute_dtype() -> None:
    base = MetaRecord(num_stages=3, model_config_hash="h")
    assert "compute_dtype" not in base.to_wire()  # a float32 run's meta is unchanged
    assert MetaRecord.from_wire(base.to_wire()) == base
    bf16 = dataclasses.replace(base, compute_dtype="bfloat16")
    assert bf16.to_wire()["compute_dtype"] == "bfloat16" and MetaRecord.from_wire(bf16.to_wire()) == bf16
    assert MetaRecord.from_wire({**bf16.to_wire(), "compute_dtype": "int8"}) is None
    assert MetaRecord.from_wire({**bf16.to_wire(), "compute_dtype": 3}) is None


def test_a_joiner_with_another_compute_dtype_is_refused_naming_the_flag() -> None:
    def meta(dtype: str) -> MetaRecord:
        config = NodeConfig(model=CFG, train=TrainConfig(compute_dtype=dtype))
        return _meta_record(type("Host", (), {"config": config})())  # type: ignore[arg-type]

    assert meta("bfloat16").compute_dtype == "bfloat16"
    problem = meta_mismatch("r", meta("bfloat16"), meta("float32"), preset="tiny")
    assert problem is not None and "\n" not in problem
    assert "--compute-dtype bfloat16" in problem and "--compute-dtype float32" in problem
    assert meta_mismatch("r", meta("float16"), meta("float16"), preset="tiny") is None
