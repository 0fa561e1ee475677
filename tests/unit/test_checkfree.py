"""The CheckFree recovery math (cfnode.recovery.checkfree): pure tensor functions, no I/O.

The rule (shared/design/reference/checkfree.md §1.1, §7.1), for a lost intermediate stage i:

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = |g_{i+1}| + 1e-4,   b = |g_{i-1}| + 1e-4

tensor by tensor, layers paired by their local index inside the stage.

Golden fixture: tests/golden/checkfree_grad_avg.json pins the exact float32 bits of `weighted_average` on
small hand-written inputs. Regenerate it (only after a deliberate change of the math) with

    CFNODE_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_checkfree.py -k golden_fixture

which first checks the new outputs against the hand-computed literals below, then rewrites the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from cfnode.config import PRESETS
from cfnode.recovery.checkfree import (
    EPS,
    RULES,
    Neighbour,
    check_compatible,
    copy_of,
    rebuild,
    uniform_average,
    weighted_average,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "checkfree_grad_avg.json"

# -- hand-written inputs --------------------------------------------------------------------------------------

PREV = {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.0, -1.0, 0.5]}
NEXT = {"w": [[5.0, 6.0], [7.0, 8.0]], "b": [1.0, 1.0, -0.5]}
PREV_NORM, NEXT_NORM = 0.2, 0.6

# Worked by hand:  a = 0.6 + 1e-4 = 0.6001,  b = 0.2 + 1e-4 = 0.2001,  a + b = 0.8002.
#   W = (a*W_next + b*W_prev)/(a+b) = W_prev + (a/(a+b)) * (W_next - W_prev)
#   a/(a+b) = 0.6001/0.8002 = 0.75 - 0.00005/0.8002 = 0.75 - 0.0000624843789 = 0.7499375156211
#   w: W_next - W_prev = 4 everywhere, 4 * 0.7499375156211 = 2.9997500624844
#   b: W_next - W_prev = (1, 2, -1)
EXPECTED = {
    "w": [[3.9997500624844, 4.9997500624844], [5.9997500624844, 6.9997500624844]],
    "b": [0.7499375156211, 0.4998750312422, -0.2499375156211],
}

# Second golden case: squared norms (power=2) and the next side two stages away.
#   a = (0.6^2 + 1e-4)/2 = 0.18005,  b = (0.2^2 + 1e-4)/1 = 0.0401,  a/(a+b) = 0.18005/0.22015 = 0.8178514649103
#   w: 1 + 4*0.8178514649103 = 4.2714058596412 (and +1, +2, +3)
#   b: (0.8178514649103, -1 + 1.6357029298206, 0.5 - 0.8178514649103)
EXPECTED_P2_D2 = {
    "w": [[4.2714058596412, 5.2714058596412], [6.2714058596412, 7.2714058596412]],
    "b": [0.8178514649103, 0.6357029298206, -0.3178514649103],
}

GOLDEN_CASES = (
    {"name": "paper-rule", "prev_norm": PREV_NORM, "next_norm": NEXT_NORM, "prev_distance": 1,
     "next_distance": 1, "power": 1.0, "expected_by_hand": EXPECTED},
    {"name": "squared-norms-next-at-distance-2", "prev_norm": PREV_NORM, "next_norm": NEXT_NORM,
     "prev_distance": 1, "next_distance": 2, "power": 2.0, "expected_by_hand": EXPECTED_P2_D2},
)


def tensors(values: dict[str, list], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=dtype) for k, v in values.items()}


def side(values: dict[str, list], norm: float, *, distance: int = 1, dtype: torch.dtype = torch.float32,
         step: int = 0) -> Neighbour:
    return Neighbour(state=tensors(values, dtype), grad_norm=norm, distance=distance, step=step)


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in state.items()}


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def fresh_like(values: dict[str, list]) -> dict[str, torch.Tensor]:
    """A seeded 'initial' template with the same keys/shapes/dtypes as the inputs."""
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(torch.tensor(v).shape, generator=g) for k, v in values.items()}


# -- golden ---------------------------------------------------------------------------------------------------


def test_golden_grad_avg_matches_hand_computed_numbers() -> None:
    got = weighted_average(side(PREV, PREV_NORM), side(NEXT, NEXT_NORM))
    assert set(got) == {"w", "b"}
    for k, want in EXPECTED.items():
        assert got[k].dtype == torch.float32
        assert_close(got[k], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def test_golden_squared_norms_and_distance_match_hand_computed_numbers() -> None:
    got = weighted_average(side(PREV, PREV_NORM), side(NEXT, NEXT_NORM, distance=2), power=2.0)
    for k, want in EXPECTED_P2_D2.items():
        assert_close(got[k], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)


def _run_case(case: dict) -> dict[str, torch.Tensor]:
    return weighted_average(side(PREV, case["prev_norm"], distance=case["prev_distance"]),
                            side(NEXT, case["next_norm"], distance=case["next_distance"]), power=case["power"])


def _write_golden() -> None:
    cases = []
    for case in GOLDEN_CASES:
        got = _run_case(case)
        for k, want in case["expected_by_hand"].items():  # never pin bits that disagree with the hand math
            assert_close(got[k], torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=0)
        cases.append({
            "name": case["name"],
            "prev_norm": case["prev_norm"], "next_norm": case["next_norm"],
            "prev_distance": case["prev_distance"], "next_distance": case["next_distance"],
            "power": case["power"], "eps": EPS,
            "expected": {k: t.tolist() for k, t in got.items()},
        })
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "about": "Golden outputs of cfnode.recovery.checkfree.weighted_average (the CheckFree grad-avg rule): "
                 "W = (a*W_next + b*W_prev)/(a+b), a = (|g_next|^power + eps)/d_next, "
                 "b = (|g_prev|^power + eps)/d_prev. float32 tensors stored as nested lists.",
        "regenerate": "CFNODE_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_checkfree.py "
                      "-k golden_fixture",
        "dtype": "float32",
        "prev": PREV,
        "next": NEXT,
        "cases": cases,
    }
    GOLDEN.write_text(json.dumps(doc, indent=2) + "\n")


def test_golden_fixture_reproduced_exactly() -> None:
    if os.environ.get("CFNODE_WRITE_GOLDEN") == "1":
        _write_golden()
    doc = json.loads(GOLDEN.read_text())
    assert doc["prev"] == PREV and doc["next"] == NEXT
    assert [c["name"] for c in doc["cases"]] == [c["name"] for c in GOLDEN_CASES]
    for stored in doc["cases"]:
        prev = Neighbour(state=tensors(doc["prev"]), grad_norm=stored["prev_norm"], distance=stored["prev_distance"])
        nxt = Neighbour(state=tensors(doc["next"]), grad_norm=stored["next_norm"], distance=stored["next_distance"])
        got = weighted_average(prev, nxt, eps=stored["eps"], power=stored["power"])
        assert set(got) == set(stored["expected"])
        for k, want in stored["expected"].items():
            assert torch.equal(got[k].to(torch.float32), torch.tensor(want, dtype=torch.float32)), \
                f"{stored['name']}: {k} drifted from the golden bits"


# -- direction and shape of the weighting ---------------------------------------------------------------------


def test_larger_grad_norm_dominates() -> None:
    zeros = {"x": [0.0, 0.0]}
    ones = {"x": [1.0, 1.0]}
    # next has the larger norm -> result nearer to next (= 1)
    got = weighted_average(side(zeros, 0.1), side(ones, 0.9))["x"]
    assert bool((got > 0.5).all())
    # prev has the larger norm -> result nearer to prev (= 0)
    got = weighted_average(side(zeros, 0.9), side(ones, 0.1))["x"]
    assert bool((got < 0.5).all())
    # weight on next is a/(a+b) exactly
    got = weighted_average(side(zeros, 0.1), side(ones, 0.9))["x"]
    assert_close(got, torch.full((2,), (0.9 + EPS) / (1.0 + 2 * EPS)), atol=1e-7, rtol=0)


@pytest.mark.parametrize("norm", [0.0, 0.3, 1.0])
def test_equal_norms_give_the_uniform_average(norm: float) -> None:
    prev, nxt = side(PREV, norm), side(NEXT, norm)
    got = weighted_average(prev, nxt)
    want = uniform_average(prev, nxt)
    for k in got:
        assert_close(got[k], want[k], atol=1e-6, rtol=0)
    assert_close(got["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), atol=1e-6, rtol=0)


def test_zero_norms_on_both_sides_use_eps_and_give_uniform() -> None:
    got = weighted_average(side(PREV, 0.0), side(NEXT, 0.0))
    assert all(bool(torch.isfinite(t).all()) for t in got.values())
    assert_close(got["b"], torch.tensor([0.5, 0.0, 0.0]), atol=1e-7, rtol=0)
    # eps alone decides the weights: eps=0 would be 0/0
    got = weighted_average(side(PREV, 0.0), side(NEXT, 0.0), eps=1e-3)
    assert_close(got["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_result_dtype_is_the_input_dtype(dtype: torch.dtype) -> None:
    prev, nxt = side(PREV, 0.2, dtype=dtype), side(NEXT, 0.6, dtype=dtype)
    for out in (weighted_average(prev, nxt), uniform_average(prev, nxt), copy_of(prev)):
        assert {k: t.dtype for k, t in out.items()} == {"w": dtype, "b": dtype}
        assert {k: t.shape for k, t in out.items()} == {k: t.shape for k, t in prev.state.items()}


def test_inputs_are_not_mutated() -> None:
    prev, nxt = side(PREV, 0.2), side(NEXT, 0.6)
    fresh = fresh_like(PREV)
    before = [clone_state(dict(prev.state)), clone_state(dict(nxt.state)), clone_state(fresh)]
    weighted_average(prev, nxt)
    uniform_average(prev, nxt)
    copy_of(prev)
    for rule in RULES:
        rebuild(rule, prev=prev, nxt=nxt, fresh=fresh)
    assert_state_equal(dict(prev.state), before[0])
    assert_state_equal(dict(nxt.state), before[1])
    assert_state_equal(fresh, before[2])


def test_distance_weighting_nearer_side_gets_twice_the_weight() -> None:
    zeros, threes = {"x": [0.0, 0.0, 0.0]}, {"x": [3.0, 3.0, 3.0]}
    # prev at distance 1, next at distance 2, equal norms: (2*prev + 1*next)/3
    got = weighted_average(side(zeros, 0.5, distance=1), side(threes, 0.5, distance=2))["x"]
    assert_close(got, torch.full((3,), 1.0), atol=1e-6, rtol=0)
    # mirrored: prev at distance 2, next at distance 1: (1*prev + 2*next)/3
    got = weighted_average(side(zeros, 0.5, distance=2), side(threes, 0.5, distance=1))["x"]
    assert_close(got, torch.full((3,), 2.0), atol=1e-6, rtol=0)


def test_power_two_squares_the_norms() -> None:
    zeros, ones = {"x": [0.0]}, {"x": [1.0]}
    prev, nxt = side(zeros, 0.2), side(ones, 0.6)
    squared = weighted_average(prev, nxt, power=2.0)["x"]
    a, b = 0.6**2 + EPS, 0.2**2 + EPS  # 0.3601, 0.0401
    assert_close(squared, torch.tensor([a / (a + b)]), atol=1e-7, rtol=0)  # 0.89979...
    linear = weighted_average(prev, nxt)["x"]
    assert float(squared) > float(linear)  # squaring sharpens towards the larger norm
    # power=2 with norms n equals power=1 with norms n^2
    same = weighted_average(side(zeros, 0.04), side(ones, 0.36))["x"]
    assert_close(squared, same, atol=1e-7, rtol=0)


# -- the other rules ------------------------------------------------------------------------------------------


def test_uniform_average_is_the_midpoint() -> None:
    got = uniform_average(side(PREV, 0.01), side(NEXT, 0.99))  # norms are ignored
    assert_close(got["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), atol=0, rtol=0)
    assert_close(got["b"], torch.tensor([0.5, 0.0, 0.0]), atol=0, rtol=0)


def test_copy_of_is_a_clone() -> None:
    src = side(PREV, 0.2)
    out = copy_of(src)
    assert_state_equal(out, tensors(PREV))
    for k in out:
        assert out[k].data_ptr() != src.state[k].data_ptr()
        out[k].add_(100.0)
    assert_state_equal(dict(src.state), tensors(PREV))


def test_rules_constant() -> None:
    assert RULES == ("grad-avg", "uniform-avg", "copy", "random")


def test_rebuild_grad_avg() -> None:
    prev, nxt = side(PREV, 0.2), side(NEXT, 0.6)
    state, how = rebuild("grad-avg", prev=prev, nxt=nxt, fresh=fresh_like(PREV))
    assert how == "grad-avg"
    assert_state_equal(state, weighted_average(prev, nxt))
    # eps and power are passed through
    state, _ = rebuild("grad-avg", prev=prev, nxt=nxt, fresh=fresh_like(PREV), power=2.0, eps=1e-2)
    assert_state_equal(state, weighted_average(prev, nxt, power=2.0, eps=1e-2))


def test_rebuild_uniform_avg() -> None:
    prev, nxt = side(PREV, 0.2), side(NEXT, 0.6)
    state, how = rebuild("uniform-avg", prev=prev, nxt=nxt, fresh=fresh_like(PREV))
    assert how == "uniform-avg"
    assert_state_equal(state, uniform_average(prev, nxt))


@pytest.mark.parametrize(("prev_d", "next_d", "want_how"),
                         [(1, 1, "copy(prev)"), (2, 2, "copy(prev)"), (1, 2, "copy(prev)"), (2, 1, "copy(next)")])
def test_rebuild_copy_takes_the_nearer_side_ties_to_prev(prev_d: int, next_d: int, want_how: str) -> None:
    prev, nxt = side(PREV, 0.9, distance=prev_d), side(NEXT, 0.1, distance=next_d)
    state, how = rebuild("copy", prev=prev, nxt=nxt, fresh=fresh_like(PREV))
    assert how == want_how
    source = prev if want_how == "copy(prev)" else nxt
    assert_state_equal(state, dict(source.state))
    state["w"].add_(1.0)  # a clone, not the donor's tensors
    assert_state_equal(dict(source.state), tensors(PREV if source is prev else NEXT))


def test_rebuild_random_returns_a_clone_of_fresh() -> None:
    fresh = fresh_like(PREV)
    kept = clone_state(fresh)
    for prev, nxt in ((side(PREV, 0.2), side(NEXT, 0.6)), (None, None), (side(PREV, 0.2), None)):
        state, how = rebuild("random", prev=prev, nxt=nxt, fresh=fresh)
        assert how == "random"
        assert_state_equal(state, kept)
        for k in state:
            assert state[k].data_ptr() != fresh[k].data_ptr()
            state[k].mul_(0)
        assert_state_equal(fresh, kept)


@pytest.mark.parametrize("rule", ["grad-avg", "uniform-avg", "copy"])
def test_rebuild_with_one_side_missing_copies_the_other(rule: str) -> None:
    fresh = fresh_like(PREV)
    state, how = rebuild(rule, prev=side(PREV, 0.2), nxt=None, fresh=fresh)
    assert how == "copy(prev)"
    assert_state_equal(state, tensors(PREV))
    state, how = rebuild(rule, prev=None, nxt=side(NEXT, 0.6, distance=3), fresh=fresh)
    assert how == "copy(next)"
    assert_state_equal(state, tensors(NEXT))


@pytest.mark.parametrize("rule", ["grad-avg", "uniform-avg", "copy"])
def test_rebuild_with_no_neighbour_raises(rule: str) -> None:
    with pytest.raises(ValueError, match="no surviving neighbour"):
        rebuild(rule, prev=None, nxt=None, fresh=fresh_like(PREV))


def test_rebuild_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="unknown recovery rule 'median'"):
        rebuild("median", prev=side(PREV, 0.2), nxt=side(NEXT, 0.6), fresh=fresh_like(PREV))


# -- compatibility checks -------------------------------------------------------------------------------------


def _bad_states() -> Iterator[tuple[str, dict[str, torch.Tensor], str]]:
    good = tensors(NEXT)
    yield "missing key", {"w": good["w"]}, "'b'"
    yield "extra key", {**good, "extra.weight": torch.zeros(2)}, "extra.weight"
    yield "shape", {**good, "b": torch.zeros(4)}, "b is (4,)"
    yield "same numel reshape", {**good, "w": good["w"].reshape(4)}, "w is (4,)"
    yield "dtype", {**good, "w": good["w"].to(torch.float64)}, "w is (2, 2) torch.float64"
    nan = good["w"].clone()
    nan[0, 1] = float("nan")
    yield "nan", {**good, "w": nan}, "w contains NaN"
    inf = good["b"].clone()
    inf[2] = float("-inf")
    yield "inf", {**good, "b": inf}, "b contains NaN or Inf"


@pytest.mark.parametrize(("what", "bad", "message"), list(_bad_states()), ids=[c[0] for c in _bad_states()])
@pytest.mark.parametrize("bad_side", ["prev", "next"])
@pytest.mark.parametrize("rule", RULES)
def test_rebuild_rejects_incompatible_or_nonfinite_neighbour(rule: str, bad_side: str, what: str,
                                                             bad: dict[str, torch.Tensor], message: str) -> None:
    good_prev, good_next = side(PREV, 0.2), side(NEXT, 0.6)
    bad_n = Neighbour(state=bad, grad_norm=0.5)
    prev, nxt = (bad_n, good_next) if bad_side == "prev" else (good_prev, bad_n)
    with pytest.raises(ValueError, match=f"^{bad_side} neighbour: .*{re.escape(message)}"):
        rebuild(rule, prev=prev, nxt=nxt, fresh=fresh_like(PREV))


def test_rebuild_checks_a_lone_neighbour_too() -> None:
    bad = tensors(PREV)
    bad["b"][0] = float("nan")
    with pytest.raises(ValueError, match="prev neighbour: b contains NaN"):
        rebuild("grad-avg", prev=Neighbour(state=bad, grad_norm=0.1), nxt=None, fresh=fresh_like(PREV))


def test_check_compatible() -> None:
    ref = tensors(PREV)
    check_compatible(ref, tensors(NEXT), what="x")  # same keys/shapes/dtypes, finite: fine
    check_compatible(ref, {**tensors(NEXT), "b": torch.tensor([0.0, 0.0, 1.0])}, what="x")
    with pytest.raises(ValueError, match=r"^donor: keys differ \(missing \['b'\], unexpected \[\]\)$"):
        check_compatible(ref, {"w": ref["w"]}, what="donor")
    with pytest.raises(ValueError, match=r"^donor: w contains NaN or Inf$"):
        check_compatible(ref, {**ref, "w": torch.full((2, 2), float("nan"))}, what="donor")
    # integer tensors are not checked for finiteness (they cannot hold NaN) but must match dtype
    check_compatible({"i": torch.tensor([1, 2])}, {"i": torch.tensor([3, 4])}, what="x")
    with pytest.raises(ValueError, match="i is"):
        check_compatible({"i": torch.tensor([1, 2])}, {"i": torch.tensor([3.0, 4.0])}, what="x")


# -- real LLaMA stage state dicts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_stages() -> dict[str, dict[str, torch.Tensor]]:
    from cfnode.model.stages import build_stage  # torch/transformers-heavy

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for seed in (1, 2):
            out[f"seed{seed}"] = build_stage(dataclasses.replace(PRESETS["tiny"], init_seed=seed), 2).state_dict()
        out["fresh"] = build_stage(PRESETS["tiny"], 2).state_dict()
        out["seed1_stage1"] = build_stage(dataclasses.replace(PRESETS["tiny"], init_seed=1), 1).state_dict()
        out["seed1_stage0"] = build_stage(dataclasses.replace(PRESETS["tiny"], init_seed=1), 0).state_dict()
        two = dataclasses.replace(PRESETS["tiny"], layers_per_stage=2)
        for seed in (1, 2):
            out[f"two_layers_seed{seed}"] = build_stage(dataclasses.replace(two, init_seed=seed), 2).state_dict()
        out["two_layers_fresh"] = build_stage(two, 2).state_dict()
        return out
    finally:
        torch.set_num_threads(before)


def test_real_transformer_stages_are_compatible(real_stages: dict[str, dict[str, torch.Tensor]]) -> None:
    s1, s2 = real_stages["seed1"], real_stages["seed2"]
    assert set(s1) == set(s2)
    assert any(k.startswith("layers.0.self_attn.q_proj") for k in s1)
    assert not any("inv_freq" in k for k in s1)  # non-persistent RoPE buffer is not averaged
    check_compatible(real_stages["fresh"], s1, what="prev")
    check_compatible(real_stages["fresh"], s2, what="next")
    check_compatible(real_stages["fresh"], real_stages["seed1_stage1"], what="stage 1")  # same keys per stage
    with pytest.raises(ValueError, match="keys differ"):
        check_compatible(real_stages["fresh"], real_stages["seed1_stage0"], what="stage 0")


@pytest.mark.parametrize("rule", RULES)
def test_rebuild_real_stages_key_by_key(rule: str, real_stages: dict[str, dict[str, torch.Tensor]]) -> None:
    s1, s2, fresh = real_stages["seed1"], real_stages["seed2"], real_stages["fresh"]
    prev, nxt = Neighbour(state=s1, grad_norm=0.2), Neighbour(state=s2, grad_norm=0.6)
    state, how = rebuild(rule, prev=prev, nxt=nxt, fresh=fresh)
    assert set(state) == set(fresh)
    a, b = 0.6 + EPS, 0.2 + EPS
    for k in fresh:
        assert state[k].shape == fresh[k].shape and state[k].dtype == torch.float32, k
        if rule == "grad-avg":
            assert how == "grad-avg"
            assert_close(state[k], (a * s2[k] + b * s1[k]) / (a + b), atol=1e-6, rtol=1e-6)
        elif rule == "uniform-avg":
            assert_close(state[k], (s1[k] + s2[k]) / 2, atol=1e-6, rtol=1e-6)
        elif rule == "copy":
            assert how == "copy(prev)"
            assert torch.equal(state[k], s1[k])
        else:
            assert torch.equal(state[k], fresh[k])
    q = "layers.0.self_attn.q_proj.weight"
    if rule == "grad-avg":
        assert not torch.equal(s1[q], s2[q])  # different seeds really are different weights
        assert_close(state[q], (a * s2[q] + b * s1[q]) / (a + b), atol=1e-6, rtol=1e-6)


def test_layers_are_paired_by_local_index(real_stages: dict[str, dict[str, torch.Tensor]]) -> None:
    s1, s2 = real_stages["two_layers_seed1"], real_stages["two_layers_seed2"]
    assert {k.split(".")[1] for k in s1} == {"0", "1"}  # local indices, not the global 2, 3
    state, how = rebuild("grad-avg", prev=Neighbour(state=s1, grad_norm=0.2),
                         nxt=Neighbour(state=s2, grad_norm=0.6), fresh=real_stages["two_layers_fresh"])
    assert how == "grad-avg"
    a, b = 0.6 + EPS, 0.2 + EPS
    for layer in ("0", "1"):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            k = f"layers.{layer}.{name}"
            assert_close(state[k], (a * s2[k] + b * s1[k]) / (a + b), atol=1e-6, rtol=1e-6)
            other = f"layers.{1 - int(layer)}.{name}"
            assert not torch.allclose(state[k], (a * s2[other] + b * s1[other]) / (a + b))
