"""`cfnode export` / `cfnode generate` / resuming with `--model-path`, against real tiny swarms on 127.0.0.1.

One swarm (3 transformer stages) trains 10 steps and holds there (stage 0's `--debug-hold-at-step`), still
serving; it is exported once and every test of the module reads that export. The plain-transformers check runs in
a subprocess that never imports cfnode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.swarm import Harness, fetch_weights, kill_group, make_identity, run_cli, tail, wait_until

pytestmark = pytest.mark.loopback
HOLD = 10
STAGES = 3
SEED = 0


def _stop(h: Harness) -> None:
    h.stop()
    left = h.leftovers()
    assert not left, f"processes survived teardown: {left}"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A tiny swarm held at step HOLD: (harness, ready infos of stages 0..3)."""
    h = Harness(str(tmp_path_factory.mktemp("export-swarm")), "export", stages=STAGES)
    try:
        h.start_bootstrap()
        nodes = [h.start_node(f"node{i}", "--stage", str(i), *(["--debug-hold-at-step", str(HOLD)] if i == 0 else []))
                 for i in range(STAGES + 1)]
        infos = [h.ready_info(n) for n in nodes]
        wait_until(lambda: h.events(nodes[0], "held"), 240, f"stage 0 to hold at step {HOLD}")
        yield h, infos
    finally:
        _stop(h)


@pytest.fixture(scope="module")
def exported(swarm, tmp_path_factory) -> str:
    h, _ = swarm
    out = str(tmp_path_factory.mktemp("export") / "model")
    result = run_cli("export", "--peers", h.bootstrap_maddr, "--run-id", h.run_id, "--out", out, "--identity-path",
                     h.reader_identity, "--heartbeat-ttl", str(h.ttl_s), "--seed", str(SEED), timeout_s=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported step {HOLD} of run {h.run_id} to {out}" in result.stdout
    return out


PLAIN_CHECK = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    torch.save(logits, out_path)
    text = "ROMEO. But soft, what light through yonder window breaks?"
    print(json.dumps({"ids": tok(text)["input_ids"], "class": type(model).__name__,
                      "cfnode_imported": any(m == "cfnode" or m.startswith("cfnode.") for m in sys.modules)}))
""")


def _plain_logits(model_dir: str, ids: torch.Tensor, tmp_path) -> tuple[torch.Tensor, dict]:
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")
    torch.save(ids, ids_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", PLAIN_CHECK, model_dir, ids_path, out_path], capture_output=True,
                            text=True, timeout=180, cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path), json.loads(result.stdout.strip().splitlines()[-1])


def _chained_logits(infos: list[dict], reader: str, ids: torch.Tensor) -> torch.Tensor:
    """The swarm's own function: every stage fetched independently from its node and chained."""
    from cfnode.config import preset
    from cfnode.model.stages import empty_stage

    cfg = preset("tiny", num_stages=STAGES)
    fetched = fetch_weights(infos, identity=reader)
    assert {meta["step"] for meta, _ in fetched} == {HOLD}
    modules = []
    for idx, (_, state) in enumerate(fetched):
        module = empty_stage(cfg, idx)
        module.load_state_dict(state)
        modules.append(module.eval())
    with torch.no_grad():
        hidden = modules[0].embed(ids)
        for block in modules[1:]:
            hidden = block(hidden)
        return modules[0].head(hidden)


def test_export_loads_with_plain_transformers_and_matches_the_swarm(swarm, exported, tmp_path) -> None:
    h, infos = swarm
    info = json.load(open(os.path.join(exported, "cfnode.json"), encoding="utf-8"))
    assert info["step"] == HOLD and info["run_id"] == h.run_id and info["data_seed"] == SEED
    assert [s["stage"] for s in info["stages"]] == list(range(STAGES + 1))
    assert all(s["step"] == HOLD and s["generation"] == 1 for s in info["stages"])
    assert [s["peer_id"] for s in info["stages"]] == [i["peer_id"] for i in infos]
    assert any(name.endswith(".safetensors") for name in os.listdir(exported))

    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    logits, plain = _plain_logits(exported, ids, tmp_path)
    assert plain["class"] == "LlamaForCausalLM" and not plain["cfnode_imported"]
    expected = _chained_logits(infos, h.reader_identity, ids)
    assert (logits - expected).abs().max().item() <= 1e-5

    from cfnode.model.tokenizer import load_tokenizer

    text = "ROMEO. But soft, what light through yonder window breaks?"
    assert plain["ids"] == load_tokenizer().encode(text).ids, "the export's tokenizer is the run's"


def test_export_refuses_a_peer_the_nodes_do_not_authorise(swarm, tmp_path) -> None:
    h, _ = swarm
    identity, peer_id = make_identity(str(tmp_path / "stranger.id"))
    out = str(tmp_path / "model")
    result = run_cli("export", "--peers", h.bootstrap_maddr, "--run-id", h.run_id, "--out", out, "--identity-path",
                     identity, "--heartbeat-ttl", str(h.ttl_s), timeout_s=240)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"--weights-reader {peer_id}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(out)


def test_generate_prints_text_and_the_same_seed_gives_the_same_text(exported) -> None:
    from cfnode.generate import GenerateOptions, generate_text

    runs = [run_cli("generate", "--model", exported, "--prompt", "ROMEO.", "--max-new-tokens", "24", "--seed", "7")
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    texts = [r.stdout.strip() for r in runs]
    assert texts[0].startswith("ROMEO.") and len(texts[0]) > len("ROMEO.")
    assert texts[0] == texts[1]
    other = generate_text(GenerateOptions(model_dir=exported, prompt="ROMEO.", max_new_tokens=24, seed=8))
    assert other.strip() != texts[0], "another seed samples another text"


def _local_loss(model_dir: str, step: int) -> tuple[float, str]:
    """Loss of the exported model on the batch of step `step` (what a swarm's step `step + 1` reports), and the
    batch's fingerprint."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from cfnode.model.data import TokenData, batch_for_step, load_corpus
    from cfnode.train.driver import batch_fingerprint

    data = TokenData.from_corpus(load_corpus(None), Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")))
    batch = batch_for_step(data.train, seed=SEED, step=step, num_microbatches=4, microbatch_size=4, seq_len=32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(mb[:, :-1]).logits.reshape(-1, 4096),
                                                    mb[:, 1:].reshape(-1)).item() for mb in batch]
    return sum(losses) / len(losses), batch_fingerprint(batch)


LOSS_TOLERANCE = 1e-4
"""The swarm's loss (stage by stage, explicit causal mask) against one `LlamaForCausalLM` forward, float32."""


@pytest.fixture(scope="module")
def resumed(swarm, exported, tmp_path_factory):
    """A new swarm started from the export (every node `--model-path DIR`): its first step event. The exported
    swarm is stopped first (two swarms on two cores starve each other's heartbeats)."""
    _stop(swarm[0])
    h = Harness(str(tmp_path_factory.mktemp("resume-swarm")), "resumed", stages=STAGES)
    try:
        h.start_bootstrap()
        nodes = [h.start_node(f"node{i}", "--stage", str(i), "--model-path", exported,
                              *(["--debug-hold-at-step", str(HOLD + 1)] if i == 0 else []))
                 for i in range(STAGES + 1)]
        for n in nodes:
            h.ready_info(n)
        first = wait_until(lambda: h.events(nodes[0], "step"), 240, "the resumed swarm's first step")[0]
        yield first
    finally:
        _stop(h)


@pytest.mark.slow
def test_resumed_swarm_trains_on_from_the_exported_weights(exported, resumed) -> None:
    loss, sha = _local_loss(exported, resumed["step"] - 1)
    assert resumed["batch_sha"] == sha
    assert abs(resumed["loss"] - loss) <= LOSS_TOLERANCE, (resumed["loss"], loss)


@pytest.mark.slow
def test_resumed_swarm_continues_the_step_count_and_the_data_order(exported, resumed) -> None:
    """What the old swarm's step HOLD + 1 would have been: same step number, same batch, same loss."""
    loss, sha = _local_loss(exported, HOLD)
    assert resumed["step"] == HOLD + 1, f"the resumed swarm's first step is {resumed['step']}"
    assert resumed["batch_sha"] == sha
    assert abs(resumed["loss"] - loss) <= LOSS_TOLERANCE


@pytest.mark.fault
@pytest.mark.slow
def test_export_after_a_rebuild_holds_the_rebuilt_stage(make_harness, tmp_path) -> None:
    h = make_harness("export-rebuild", stages=STAGES)
    h.start_bootstrap()
    nodes = [h.start_node(f"node{i}", "--stage", str(i), *(["--debug-hold-at-step", "16"] if i == 0 else []))
             for i in range(STAGES + 1)]
    for n in nodes:
        h.ready_info(n)
    wait_until(lambda: len(h.events(nodes[0], "step")) >= 4, 180, "4 steps before the fault")
    kill_group(nodes[2])
    nodes[2].popen.wait(timeout=10)
    spare = h.start_node("spare")
    rebuilt = h.ready_info(spare, timeout_s=180)
    assert rebuilt["stage"] == 2 and rebuilt["generation"] == 2, rebuilt
    wait_until(lambda: h.events(nodes[0], "held"), 240, "stage 0 to hold at step 16")

    out = str(tmp_path / "model")
    result = run_cli("export", "--peers", h.bootstrap_maddr, "--run-id", h.run_id, "--out", out, "--identity-path",
                     h.reader_identity, "--heartbeat-ttl", str(h.ttl_s), timeout_s=240)
    assert result.returncode == 0, result.stderr[-3000:] + tail(spare.log_path)
    info = json.load(open(os.path.join(out, "cfnode.json"), encoding="utf-8"))
    assert info["step"] == 16
    row = info["stages"][2]
    assert row["generation"] == 2 and row["peer_id"] == rebuilt["peer_id"]

    (meta, state), = fetch_weights([rebuilt], identity=h.reader_identity)
    assert meta["step"] == 16
    from safetensors.torch import load_file

    exported = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            exported.update(load_file(os.path.join(out, name)))
    for key, tensor in state.items():  # stage 2 of 3 (one layer each) is decoder layer 1
        assert torch.equal(exported[f"model.layers.1.{key.removeprefix('layers.0.')}"], tensor), key
