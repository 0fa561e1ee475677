"""Take the model home: gather every stage of a run at ONE committed step and write a Hugging Face checkpoint.

Two ways in, one way out (docs/export.md):

* `cfnode export` (`export_swarm`): a short-lived client peer with a persistent identity reads the run's records,
  refuses a run with a missing or RECOVERING stage, and fetches every stage with `rpc_get_weights` (allowed for
  ring members, spares and the nodes' `--weights-reader` peers).
* stage 0 at the end of its run (`cfnode join --export-dir`, `export_from_ring`): its own weights are local, the
  transformer stages are fetched from their ONLINE owners.

Both call `gather_stages` (fetch, and fetch again the stages that are not at the common step, until every stage
is at the same step) and `write_export`, which merges the stages into one `LlamaForCausalLM` without copying
(`model.stages.merge_stage`), writes it with `save_pretrained` (safetensors), the run's tokenizer as a
`PreTrainedTokenizerFast` (so `AutoTokenizer.from_pretrained(DIR)` works) and `cfnode.json` (run id, step,
config hash, per-stage generation and rebuild). The checkpoint is written to a sibling temporary directory and
renamed into place, so DIR is either the previous export or the new one. Adam state is not exported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cfnode.config import PRESETS, ModelConfig, NetworkConfig, NodeConfig
from cfnode.errors import CfnodeError, ConfigError, PeerUnavailableError, RejectedError

if TYPE_CHECKING:
    from cfnode.net.client import StageClient
    from cfnode.net.records import SwarmView

logger = logging.getLogger(__name__)

EXPORT_INFO = "cfnode.json"
EXPORT_FORMAT = 1
GATHER_ROUNDS = 20
"""Rounds of `gather_stages` before it gives up on a swarm whose stages never agree on a step."""
FETCH_ATTEMPTS = 6
DEFAULT_IDENTITY = "export.id"


class ExportRefused(CfnodeError):
    """The swarm cannot be exported as it is (a stage missing or being rebuilt, a refused download, stages
    that never agree on a step); the message says why and what to do."""


@dataclass
class FetchedStage:
    stage: int
    step: int
    generation: int
    state: dict[str, torch.Tensor] = field(repr=False)
    peer_id: str | None = None
    grad_norm: float | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


FetchStage = Callable[[int], Awaitable[FetchedStage]]
OnFetched = Callable[[FetchedStage], None]


# -- what the swarm must look like -------------------------------------------------------------------------

def stage_owners(view: SwarmView, num_stages: int, *, skip: tuple[int, ...] = ()) -> dict[int, str]:
    """The peer id of every stage's ONLINE owner; ExportRefused naming the first stage that has none (being
    rebuilt: RECOVERING, or missing)."""
    from cfnode.net.records import StageState

    owners: dict[int, str] = {}
    for idx in range(num_stages + 1):
        if idx in skip:
            continue
        owner = view.online_owner(idx)
        rebuilding = [p for p in view.members(idx) if p.record.state is StageState.RECOVERING]
        if rebuilding:
            raise ExportRefused(f"stage {idx} is being rebuilt (RECOVERING, generation "
                                f"{rebuilding[0].record.generation}, by {rebuilding[0].peer_id[:16]}); export "
                                "once it is ONLINE")
        if owner is None:
            states = sorted({p.record.state.value for p in view.members(idx)})
            raise ExportRefused(f"stage {idx} has no ONLINE node ({'records: ' + ', '.join(states) if states else 'no record'})"
                                "; a swarm with a missing stage cannot be exported (start a node to rebuild it)")
        owners[idx] = owner.peer_id
    return owners


def resolve_model(run_hash: str | None, num_stages: int, *, preset_name: str | None = None,
                  stages: int | None = None, model_path: str | None = None) -> ModelConfig:
    """The run's ModelConfig: from --model-path, from --preset/--stages, or (neither) the preset whose config hash
    with the run's number of stages is the run's. ConfigError if it does not match the run."""
    if model_path:
        from cfnode.model.stages import model_config_from_pretrained

        cfg = model_config_from_pretrained(model_path, stages or num_stages)
    elif preset_name:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset {preset_name!r}; choose one of {sorted(PRESETS)}")
        cfg = dataclasses.replace(PRESETS[preset_name], num_stages=stages or num_stages)
    else:
        matches = [dataclasses.replace(p, num_stages=stages or num_stages) for p in PRESETS.values()]
        matches = [c for c in matches if c.config_hash() == run_hash]
        if not matches:
            raise ConfigError(f"the run's model (config hash {run_hash}) is none of the presets "
                              f"{sorted(PRESETS)} with {num_stages} stages; pass the --preset and --stages, or the "
                              "--model-path, the run was started with")
        cfg = matches[0]
    if run_hash is not None and cfg.config_hash() != run_hash:
        raise ConfigError(f"the run's model has config hash {run_hash}, but the given --preset/--stages/--model-path "
                          f"describe {cfg.config_hash()}; pass the ones the run was started with")
    return cfg


# -- gathering -----------------------------------------------------------------------------------------------

async def gather_stages(num_stages: int, fetch: FetchStage, *, local: FetchedStage | None = None,
                        rounds: int = GATHER_ROUNDS, on_fetched: OnFetched | None = None,
                        backoff_s: float = 0.2) -> dict[int, FetchedStage]:
    """Every stage 0..num_stages at one step. `local` (stage 0's own weights, at its step) is pinned: the others
    must reach its step. Without it the target is the newest step seen. Each round fetches (one stage at a time,
    so at most one stage is held twice) the stages not at the target; ExportRefused after `rounds` rounds."""
    got: dict[int, FetchedStage] = {}
    if local is not None:
        got[local.stage] = local
    pinned = local.step if local is not None else None
    for attempt in range(rounds):
        for idx in range(num_stages + 1):
            if local is not None and idx == local.stage:
                continue
            target = pinned if pinned is not None else max((f.step for f in got.values()), default=None)
            if idx in got and got[idx].step == target:
                continue
            fetched = await fetch(idx)
            if fetched.stage != idx:
                raise ExportRefused(f"asked for stage {idx}, got the weights of stage {fetched.stage}")
            got[idx] = fetched
            if on_fetched is not None:
                on_fetched(fetched)
        steps = {idx: f.step for idx, f in got.items()}
        if len(set(steps.values())) == 1:
            return got
        if pinned is not None and max(steps.values()) > pinned:
            ahead = max(steps, key=steps.__getitem__)
            raise ExportRefused(f"stage {ahead} is at step {steps[ahead]}, past stage 0's {pinned}: stage 0 is not "
                                "the one driving this run")
        logger.info("stages are at different steps %s (a commit in progress); fetching the ones behind again",
                    steps)
        await asyncio.sleep(backoff_s * (attempt + 1))
    raise ExportRefused(f"the stages never agreed on a step in {rounds} rounds (last: {steps}): the swarm commits "
                        "faster than it can be fetched; export a held or finished run (cfnode join --export-dir on "
                        "stage 0 exports at --max-steps)")


def stage_bytes(cfg: ModelConfig, stage_idx: int) -> int:
    from cfnode.model.stages import stage_shapes

    return 4 * sum(math.prod(s) for s in stage_shapes(cfg, stage_idx).values())


def rpc_fetcher(client: StageClient, owners: dict[int, str], cfg: ModelConfig, *, me: str,
                refresh_s: float, how_to_authorise: str) -> FetchStage:
    """`fetch(stage)` over rpc_get_weights from the stage's owner: retried on rate limits and transport errors
    (waiting `refresh_s`, about the nodes' ttl / 4, per try); a refusal other than those is ExportRefused."""

    async def fetch(idx: int) -> FetchedStage:
        peer = owners[idx]
        size = stage_bytes(cfg, idx)
        error: Exception | None = None
        for attempt in range(FETCH_ATTEMPTS):
            if attempt:
                await asyncio.sleep(refresh_s * attempt)
            try:
                meta, state = await client.get_weights(peer, max_bytes=size + 2**20,
                                                       timeout_s=60.0 + size / (10 * 2**20))
            except RejectedError as e:
                if e.reason == "unauthorized":
                    raise ExportRefused(f"the node holding stage {idx} ({peer[:16]}) refuses to send its weights "
                                        f"to this peer ({me}): {how_to_authorise}") from e
                if e.reason not in ("rate_limited", "not_ready", "timeout", "decode"):
                    raise ExportRefused(f"the node holding stage {idx} ({peer[:16]}) refused the download: {e}") from e
                error = e
                continue
            except PeerUnavailableError as e:
                error = e
                continue
            if meta.get("config_hash") != cfg.config_hash():
                raise ExportRefused(f"stage {idx} ({peer[:16]}) runs model {meta.get('config_hash')}, not "
                                    f"{cfg.config_hash()}")
            return FetchedStage(stage=int(meta.get("stage", -1)), step=int(meta["step"]),
                                generation=int(meta.get("generation", 0)), state=state, peer_id=peer,
                                grad_norm=meta.get("grad_norm"))
        raise ExportRefused(f"could not fetch stage {idx} from {peer[:16]} after {FETCH_ATTEMPTS} tries: {error}")

    return fetch


# -- writing -------------------------------------------------------------------------------------------------

def check_out_dir(out_dir: str) -> None:
    """DIR may be absent, empty, or an earlier export (replaced); anything else is refused before any work."""
    if os.path.isfile(out_dir):
        raise ConfigError(f"--out {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, EXPORT_INFO)):
        raise ConfigError(f"--out {out_dir} exists and is not a cfnode export (no {EXPORT_INFO}); refusing to "
                          "overwrite it")


def run_tokenizer(model_path: str | None = None, tokenizer_path: str | None = None) -> Any:
    """The run's tokenizer as a transformers fast tokenizer: `tokenizer_path` (a tokenizer.json), else the
    checkpoint's own (`model_path`, what stage 0 tokenized with), else the shipped Shakespeare BPE. Its
    end-of-text token is both eos and bos (it separates documents in the training stream)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from cfnode.model.tokenizer import EOS_TOKEN, TOKENIZER_PATH

    if tokenizer_path is None and model_path and os.path.exists(os.path.join(model_path, "tokenizer.json")):
        try:
            return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        except (OSError, ValueError) as e:  # a bare tokenizer.json without a config: wrap it below
            logger.info("loading %s as a transformers tokenizer failed (%s); wrapping its tokenizer.json",
                        model_path, e)
        tokenizer_path = os.path.join(model_path, "tokenizer.json")
    path = tokenizer_path or str(TOKENIZER_PATH)
    if not os.path.isfile(path):
        raise ConfigError(f"--tokenizer {path} is not a file")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types on a bad file
        raise ConfigError(f"--tokenizer {path} is not a tokenizer.json: {e}") from None
    if EOS_TOKEN in tok.get_vocab():
        tok.eos_token = tok.bos_token = EOS_TOKEN
    tok.cfnode_source = path  # write_export keeps this exact file as the export's tokenizer.json
    return tok


def export_llama_config(cfg: ModelConfig, model_path: str | None, tokenizer: Any) -> Any:
    """The exported model's LlamaConfig: the run's own (the checkpoint's for a --model-path run, untied), with the
    tokenizer's eos/bos ids and the KV cache on for generation. pad_token_id stays unset: a padding index would
    freeze that embedding row if the export is trained on (`cfnode join --model-path`)."""
    from transformers import LlamaConfig

    from cfnode.model.stages import llama_config

    config = (LlamaConfig.from_pretrained(model_path, local_files_only=True) if model_path else llama_config(cfg))
    config.tie_word_embeddings = False
    config.use_cache = True
    if getattr(tokenizer, "eos_token_id", None) is not None:
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    return config


def write_export(out_dir: str, cfg: ModelConfig, stages: dict[int, FetchedStage], *, run_id: str,
                 model_path: str | None = None, tokenizer_path: str | None = None, data_seed: int | None = None,
                 rebuilds: dict[int, str] | None = None, exported_by: str = "cfnode export") -> dict[str, Any]:
    """Merge `stages` (all at one step) into one LlamaForCausalLM sharing their tensors and write DIR: the
    safetensors checkpoint, the tokenizer and cfnode.json. Returns cfnode.json's content."""
    from transformers.utils import logging as hf_logging

    from cfnode.model.stages import empty_llama, merge_stage

    hf_logging.disable_progress_bar()  # our own progress is the fetch; writing a shard is one line
    steps = {f.step for f in stages.values()}
    if len(steps) != 1 or sorted(stages) != list(range(cfg.num_stages + 1)):
        raise ExportRefused(f"need every stage 0..{cfg.num_stages} at one step, got "
                            f"{ {i: f.step for i, f in stages.items()} }")
    check_out_dir(out_dir)
    tokenizer = run_tokenizer(model_path, tokenizer_path)
    model = empty_llama(cfg, export_llama_config(cfg, model_path, tokenizer))
    for idx, fetched in stages.items():
        try:
            merge_stage(model, cfg, idx, fetched.state)
        except ValueError as e:
            raise ExportRefused(str(e)) from e
    if any(p.is_meta for p in model.parameters()):  # pragma: no cover - merge_stage checks every key
        raise ExportRefused("some weights were not fetched")
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    step = steps.pop()
    info = {
        "format": EXPORT_FORMAT, "run_id": run_id, "step": step, "config_hash": cfg.config_hash(),
        "model": dataclasses.asdict(cfg), "model_path": os.path.abspath(model_path) if model_path else None,
        "data_seed": data_seed, "tokenizer": os.path.abspath(tokenizer_path) if tokenizer_path else
        ("model_path" if model_path else "shipped"), "exported_by": exported_by, "exported_at": time.time(),
        "optimizer_state": False,
        "stages": [{"stage": i, "step": f.step, "generation": f.generation, "peer_id": f.peer_id,
                    "grad_norm": f.grad_norm, "rebuilt": (rebuilds or {}).get(i)}
                   for i, f in sorted(stages.items())],
    }
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = getattr(tokenizer, "cfnode_source", None)
        if source:  # the run's own file, byte for byte (transformers adds a no-op post-processor to its copy,
            shutil.copyfile(source, os.path.join(tmp, "tokenizer.json"))  # which changes the corpus cache key)
        with open(os.path.join(tmp, EXPORT_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if os.path.isdir(out_dir):
            check_out_dir(out_dir)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        raise ExportRefused(f"writing the checkpoint to {out_dir} failed: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported step %d of run %s to %s", step, run_id, out_dir)
    return info


def read_export_info(model_dir: str) -> dict[str, Any] | None:
    """cfnode.json of an export (None for another checkpoint); ConfigError if it is unreadable."""
    path = os.path.join(model_dir, EXPORT_INFO)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        int(info["step"]), int(info["model"]["num_stages"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a cfnode export description: {e}") from None
    return info


def annotate_rebuilds(out_dir: str, rebuilds: dict[int, str]) -> None:
    """Record, in an export's cfnode.json, how stages were last rebuilt (known to whoever watched the events)."""
    path = os.path.join(out_dir, EXPORT_INFO)
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    for row in info["stages"]:
        if row["stage"] in rebuilds:
            row["rebuilt"] = rebuilds[row["stage"]]
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(f"{path}.tmp", path)


# -- the two ways in -----------------------------------------------------------------------------------------

async def export_from_ring(out_dir: str, *, config: NodeConfig, stage0_state: dict[str, torch.Tensor], step: int,
                           generation: int, client: StageClient, view: SwarmView, peer_id: str,
                           on_fetched: OnFetched | None = None) -> dict[str, Any]:
    """Stage 0's end-of-run export: its own `stage0_state` at `step` plus every transformer stage fetched from
    its ONLINE owner in `view` with `client`, at that same step. Blocks on torch work (merge, save): call it when
    nothing else needs the loop (after the driver finished). Returns cfnode.json's content."""
    cfg = config.model
    owners = stage_owners(view, cfg.num_stages, skip=(0,))
    fetch = rpc_fetcher(client, owners, cfg, me=peer_id, refresh_s=config.heartbeat.ttl_s / 4,
                        how_to_authorise="stage 0 exports only while it is a ring member")
    local = FetchedStage(stage=0, step=step, generation=generation, state=stage0_state, peer_id=peer_id)
    stages = await gather_stages(cfg.num_stages, fetch, local=local, on_fetched=on_fetched)
    return await asyncio.to_thread(write_export, out_dir, cfg, stages, run_id=config.run_id,
                                   model_path=config.model_path, data_seed=config.data.seed, exported_by="stage 0")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    peers: tuple[str, ...]
    out_dir: str
    run_id: str = "cfnode"
    identity_path: str = DEFAULT_IDENTITY
    preset_name: str | None = None
    stages: int | None = None
    model_path: str | None = None
    tokenizer_path: str | None = None
    data_seed: int | None = None
    ttl_s: float = 8.0
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)


def export_peer_id(identity_path: str) -> str:
    """The peer id the exporter runs as (created with the identity file if absent): what nodes pass to
    --weights-reader."""
    from cfnode.net.identity import open_identity

    return open_identity(identity_path).peer_id


def export_swarm(options: ExportOptions, *, on_start: Callable[[int, int], None] | None = None,
                 on_fetched: OnFetched | None = None) -> dict[str, Any]:
    """`cfnode export`: read the run, refuse a missing/RECOVERING stage, fetch every stage at one step, write DIR.
    `on_start(num_stages, total_bytes)` is called once the run is known. Returns cfnode.json's content."""
    from cfnode.net.dht import create_dht
    from cfnode.net.identity import open_identity
    from cfnode.net.validation import RunRecordValidator
    from cfnode.status import DEFAULT_MAX_STAGES

    check_out_dir(options.out_dir)
    identity = open_identity(options.identity_path)
    validators = [identity.signature_validator(), RunRecordValidator(options.run_id, DEFAULT_MAX_STAGES,
                                                                     ttl_s=options.ttl_s)]
    net = NetworkConfig(initial_peers=options.peers, host_maddrs=options.host_maddrs,
                        identity_path=options.identity_path)
    dht = create_dht(net, client_mode=True, validators=validators, identity=identity)
    try:
        return asyncio.run(_export_swarm(dht, identity.peer_id, options, on_start, on_fetched))
    finally:
        dht.shutdown()


async def _export_swarm(dht: Any, me: str, options: ExportOptions, on_start: Callable[[int, int], None] | None,
                        on_fetched: OnFetched | None) -> dict[str, Any]:
    from cfnode.metrics import NodeMetrics
    from cfnode.net.client import StageClient
    from cfnode.net.dht import SwarmDHT
    from cfnode.net.records import run_meta
    from cfnode.status import READ_TIMEOUT_S, _stages_to_read

    def reader(num_stages: int) -> SwarmDHT:
        return SwarmDHT(dht, run_id=options.run_id, num_stages=num_stages, ttl_s=options.ttl_s,
                        timeout_s=READ_TIMEOUT_S)

    metas = await reader(0).read_meta()
    guess = _stages_to_read(max((m.num_stages for m in metas.values()), default=0))
    view = await reader(guess).read_view()
    meta = run_meta(metas, view)
    if meta is None:
        raise ExportRefused(f"no live node of run {options.run_id!r} found through {list(options.peers)}")
    if _stages_to_read(meta.num_stages) != guess:
        view = await reader(_stages_to_read(meta.num_stages)).read_view()
    cfg = resolve_model(meta.model_config_hash, meta.num_stages, preset_name=options.preset_name,
                        stages=options.stages, model_path=options.model_path)
    owners = stage_owners(view, cfg.num_stages)
    if on_start is not None:
        on_start(cfg.num_stages, sum(stage_bytes(cfg, i) for i in range(cfg.num_stages + 1)))
    p2p = await dht.replicate_p2p()
    try:
        client = StageClient(p2p, NetworkConfig(request_timeout_s=30.0), NodeMetrics())
        fetch = rpc_fetcher(client, owners, cfg, me=me, refresh_s=options.ttl_s / 4, how_to_authorise=(
            f"start the nodes with `--weights-reader {me}` (this peer id is kept in {options.identity_path}; pass "
            "the same --identity-path next time)"))
        stages = await gather_stages(cfg.num_stages, fetch, on_fetched=on_fetched)
    finally:
        try:
            await asyncio.wait_for(p2p.shutdown(), 5)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            logger.debug("p2p shutdown: %s", e)
    return await asyncio.to_thread(write_export, options.out_dir, cfg, stages, run_id=options.run_id,
                                   model_path=options.model_path, tokenizer_path=options.tokenizer_path,
                                   data_seed=options.data_seed)


class ProgressBar:
    """`cfnode export`'s progress: a tqdm bar over the bytes to fetch (stderr; none when not a terminal) and one
    log line per fetched stage."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.seen: set[int] = set()

    def start(self, num_stages: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="fetching", unit="B", unit_scale=True, disable=None)

    def fetched(self, fetched: FetchedStage) -> None:
        if self.bar is not None and fetched.stage not in self.seen:
            self.seen.add(fetched.stage)
            self.bar.update(fetched.nbytes)
        logger.info("fetched stage %d (step %d, generation %d, %.1f MB)", fetched.stage, fetched.step,
                    fetched.generation, fetched.nbytes / 1e6)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
