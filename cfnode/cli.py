"""The `cfnode` command: bootstrap, join, status, export, generate, demo, experiment. Builds the one frozen NodeConfig; no business logic.

Every flag also reads an environment variable `CFNODE_<COMMAND>_<FLAG>` (click auto_envvar_prefix).
Exit codes: 0 clean, 2 usage, 3 no peer reachable, 4 identity taken, 5 unrecoverable swarm state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import click

from cfnode.config import (
    ENGINES,
    EVENT_LOOPS,
    PRESETS,
    RECOVERY_MODES,
    WIRE_DTYPES,
    DataConfig,
    GroupConfig,
    HeartbeatConfig,
    MetricsConfig,
    NetworkConfig,
    NodeConfig,
    RecoveryConfig,
    TrainConfig,
    preset,
)
from cfnode.device import COMPUTE_DTYPES
from cfnode.errors import CfnodeError, ConfigError
from cfnode.eventloop import run_loop
from cfnode.logs import setup_logging
from cfnode.net.peers import parse_peers

logger = logging.getLogger("cfnode.cli")
_D = NodeConfig()
_T, _H, _N = _D.train, _D.heartbeat, _D.network


def _checked_peers(values: tuple[str, ...]) -> tuple[str, ...]:
    """parse_peers, or exit 2 with its one-line error before anything starts."""
    try:
        return parse_peers(values)
    except ConfigError as e:
        _fail(e)


def _checked_device(requested: str) -> str:
    """The concrete device for `--device` on this machine, or exit 2 with its one-line error."""
    from cfnode.device import probe_device

    try:
        return probe_device(requested)
    except ConfigError as e:
        _fail(e)


def _fail(err: CfnodeError) -> NoReturn:
    click.echo(f"error: {err}", err=True)
    sys.exit(err.exit_code)


def _write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


logging_options = [
    click.option("--log-level", default="INFO", show_default=True,
                 type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)),
    click.option("--log-format", default="text", show_default=True, type=click.Choice(["text", "json"])),
]


def _with(options: list[Any]) -> Any:
    def deco(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@click.group(context_settings={"auto_envvar_prefix": "CFNODE", "show_default": True,
                               "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cfnode")
def main() -> None:
    """cfnode: train a LLaMA model together on unreliable machines (Hivemind + CheckFree)."""


@main.command()
@click.option("--host-maddrs", multiple=True, default=("/ip4/0.0.0.0/tcp/31337",),
              help="Multiaddrs to listen on (repeatable).")
@click.option("--announce-maddrs", multiple=True, help="Public multiaddrs to advertise (explicit port).")
@click.option("--identity-path", default="bootstrap.id", help="Persistent identity (created if absent).")
@click.option("--metrics-host", default="127.0.0.1")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics here (0: any free port).")
@_with(logging_options)
def bootstrap(host_maddrs: tuple[str, ...], announce_maddrs: tuple[str, ...], identity_path: str,
              metrics_host: str, metrics_port: int | None, log_level: str, log_format: str) -> None:
    """Run a DHT-only entry peer and print the line others paste to join."""
    from cfnode.bootstrap import run_bootstrap

    setup_logging(log_level, log_format)
    try:
        net = NetworkConfig(host_maddrs=host_maddrs, announce_maddrs=announce_maddrs, identity_path=identity_path)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e

    def announce(lines: list[str]) -> None:
        for line in lines:
            click.echo(line)
        sys.stdout.flush()

    try:
        run_bootstrap(net, announce, MetricsConfig(host=metrics_host, port=metrics_port))
    except CfnodeError as e:
        _fail(e)


@main.command()
@click.option("--peers", "--initial-peers", "peers", multiple=True, required=True,
              help="Multiaddr of a running peer, e.g. the bootstrap's (repeatable).")
@click.option("--stage", default="auto", help="auto (lowest empty stage, else STANDBY) or a stage index.")
@click.option("--run-id", default=_D.run_id, help="Name of the training run (DHT key prefix).")
@click.option("--replicas", type=int, default=1, show_default=True,
              help="Most members per stage group (run-wide): with more than 1, a node that finds no empty stage "
                   "joins the group with the least throughput and trains with it data-parallel.")
@click.option("--spare", is_flag=True, help="Wait as STANDBY to replace a lost stage: never join a live stage group, "
              "never claim a stage before the swarm has trained.")
@click.option("--preset", "preset_name", default="small", type=click.Choice(sorted(PRESETS)),
              envvar="CFNODE_JOIN_PRESET")
@click.option("--stages", type=int, default=None, help="Override the preset's number of transformer stages.")
@click.option("--model-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local pretrained Llama checkpoint; this node trains its slice of it.")
@click.option("--data", default=None, help="Local text file/dir/glob or a locally available datasets name.")
@click.option("--seed", type=int, default=0, help="Data order seed.")
@click.option("--init-seed", type=int, default=0,
              help="Seed of the initial weights (run-wide; ignored with --model-path).")
@click.option("--lr", type=float, default=_T.lr)
@click.option("--microbatches", type=int, default=_T.num_microbatches, help="Microbatches per step.")
@click.option("--microbatch-size", type=int, default=_T.microbatch_size)
@click.option("--max-in-flight", type=int, default=_T.max_in_flight)
@click.option("--max-steps", type=int, default=None, help="Stage 0 stops driving after this many steps.")
@click.option("--val-every", type=int, default=_T.val_every, help="Validate every N steps (0: never).")
@click.option("--val-batches", type=int, default=_T.val_batches)
@click.option("--step-timeout", type=float, default=_T.step_timeout_s, help="Seconds before stage 0 aborts a step.")
@click.option("--request-timeout", type=float, default=_N.request_timeout_s, help="Seconds per RPC.")
@click.option("--weights-reader", "weights_readers", multiple=True,
              help="Peer id (base58) outside the run allowed to fetch weights, e.g. an exporter (repeatable).")
@click.option("--max-message-bytes", type=int, default=_N.max_message_bytes,
              help="Byte cap of one incoming tensor stream.")
@click.option("--threads", type=int, default=_T.num_threads, help="torch threads of this node.")
@click.option("--device", default="cpu",
              help="Where this node's stage trains: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")
@click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="float32",
              help="Run-wide: autocast forward passes to this dtype over float32 weights and Adam state "
                   "(float16: a static loss scale, see docs/operations.md).")
@click.option("--wire-dtype", type=click.Choice(list(WIRE_DTYPES)), default="float32",
              help="Run-wide: how activations and gradients travel between stages (float16, bfloat16 and uint8 "
                   "compress them; weights always travel exactly).")
@click.option("--event-loop", type=click.Choice(list(EVENT_LOOPS)), default=_N.event_loop,
              help="This node's asyncio event loop: the standard library's or uvloop (libuv).")
@click.option("--identity-path", default=None, help="Persistent identity file (created if absent).")
@click.option("--host-maddrs", multiple=True, default=("/ip4/0.0.0.0/tcp/0",))
@click.option("--announce-maddrs", multiple=True)
@click.option("--metrics-host", default="127.0.0.1")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics here (0: any free port).")
@click.option("--heartbeat-period", type=float, default=_H.period_s, help="Seconds between heartbeats.")
@click.option("--heartbeat-ttl", type=float, default=_H.ttl_s, help="Seconds before a silent node is gone.")
@click.option("--recovery", default="checkfree", type=click.Choice(list(RECOVERY_MODES)),
              help="checkfree: rebuild lost transformer stages; checkfree+ (needs --stages >= 4): also swap edge "
                   "stages on odd microbatches and replicate stage 0 on stages 1 and L, so every stage survives. "
                   "checkpoint and redundant are the baselines of `cfnode experiment`.")
@click.option("--recovery-rule", default="grad-avg", type=click.Choice(["grad-avg", "uniform-avg", "copy", "random"]),
              help="How a lost middle stage is rebuilt.")
@click.option("--lr-scale", type=float, default=1.1, help="LR multiplier of a rebuilt stage's fresh optimizer.")
@click.option("--audit-recovery", default=None, help="Write each rebuild's donor and rebuilt tensors to this dir.")
@click.option("--debug-recovery-stall", type=float, default=0.0, hidden=True)
@click.option("--debug-hold-at-step", type=int, default=None, hidden=True)
@click.option("--debug-kill-mid-step", type=int, default=None, hidden=True)
@click.option("--checkpoint-dir", default=None,
              help="--recovery checkpoint: the checkpoint store, a directory every node of the swarm can reach.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="--recovery checkpoint: save every stage's weights and Adam state every N steps.")
@click.option("--events-file", default=None, help="Append JSON-lines swarm events here.")
@click.option("--ready-file", default=None, help="Write {peer_id, maddrs, stage, metrics_port} here when ready.")
@click.option("--export-dir", default=None,
              help="On stage 0: write the whole model as a Hugging Face checkpoint here at --max-steps.")
@click.option("--export-on-exit", is_flag=True, help="With --export-dir: also export when stopped (SIGTERM/Ctrl-C).")
@_with(logging_options)
def join(**kw: Any) -> None:
    """Join a training run: claim a stage (or wait as a spare) and train it with the neighbours."""
    setup_logging(kw["log_level"], kw["log_format"])
    kw["peers"] = _checked_peers(kw["peers"])
    kw["device"] = _checked_device(kw["device"])
    try:
        config = _join_config(kw)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    try:
        _run_join(config)
    except CfnodeError as e:
        _fail(e)


def join_config_from_argv(argv: list[str]) -> NodeConfig:
    """The NodeConfig `cfnode join ARGV` would run with (environment variables aside): what the local engine of
    `cfnode experiment` gives each in-process node, so that it is configured exactly like a swarm node."""
    try:
        ctx = join.make_context("join", list(argv))
    except click.ClickException as e:
        raise ConfigError(f"join {' '.join(argv)}: {e.format_message()}") from e
    from cfnode.device import probe_device

    kw = dict(ctx.params)
    kw["peers"] = parse_peers(kw["peers"])
    kw["device"] = probe_device(kw["device"])
    return _join_config(kw)


def _join_config(kw: dict[str, Any]) -> NodeConfig:
    stage = kw["stage"]
    if stage != "auto":
        try:
            stage = int(stage)
        except ValueError as e:
            raise ConfigError(f"--stage must be 'auto' or an integer, got {stage!r}") from e
    else:
        stage = None
    if kw["model_path"]:
        from cfnode.export import read_export_info
        from cfnode.model.stages import model_config_from_pretrained

        exported = read_export_info(kw["model_path"])  # an export: its own number of stages by default
        default_stages = exported["model"]["num_stages"] if exported else PRESETS[kw["preset_name"]].num_stages
        model = model_config_from_pretrained(kw["model_path"], kw["stages"] or default_stages)
        start_step = int(exported["step"]) if exported else 0
        if exported:
            logger.info("%s is the export of run %s at step %d: training goes on from step %d with fresh Adam state "
                        "(docs/export.md, resuming)", kw["model_path"], exported["run_id"], start_step, start_step)
    else:
        model = preset(kw["preset_name"], num_stages=kw["stages"], init_seed=kw["init_seed"])
        start_step = 0
    if kw["export_dir"]:
        from cfnode.export import check_out_dir

        check_out_dir(kw["export_dir"])
    if kw["identity_path"]:
        from cfnode.bootstrap import ensure_identity

        ensure_identity(kw["identity_path"])
    return NodeConfig(
        run_id=kw["run_id"], stage=stage, model=model, model_path=kw["model_path"],
        data=DataConfig(source=kw["data"], seed=kw["seed"]),
        train=TrainConfig(lr=kw["lr"], num_microbatches=kw["microbatches"], microbatch_size=kw["microbatch_size"],
                          max_in_flight=kw["max_in_flight"], max_steps=kw["max_steps"], val_every=kw["val_every"],
                          val_batches=kw["val_batches"], step_timeout_s=kw["step_timeout"],
                          num_threads=kw["threads"], debug_hold_at_step=kw["debug_hold_at_step"],
                          debug_kill_mid_step=kw["debug_kill_mid_step"],
                          start_step=start_step, device=kw["device"], compute_dtype=kw["compute_dtype"]),
        network=NetworkConfig(initial_peers=parse_peers(kw["peers"]), host_maddrs=kw["host_maddrs"],
                              announce_maddrs=kw["announce_maddrs"], identity_path=kw["identity_path"],
                              request_timeout_s=kw["request_timeout"],
                              max_message_bytes=kw["max_message_bytes"],
                              weights_readers=tuple(kw["weights_readers"]), wire_dtype=kw["wire_dtype"],
                              event_loop=kw["event_loop"]),
        heartbeat=HeartbeatConfig(period_s=kw["heartbeat_period"], ttl_s=kw["heartbeat_ttl"],
                                  claim_jitter_s=min(1.0, kw["heartbeat_period"])),
        recovery=RecoveryConfig(mode=kw["recovery"], rule=kw["recovery_rule"], lr_scale=kw["lr_scale"],
                                audit_dir=kw["audit_recovery"], debug_stall_s=kw["debug_recovery_stall"],
                                checkpoint_dir=kw["checkpoint_dir"], checkpoint_every=kw["checkpoint_every"]),
        metrics=MetricsConfig(host=kw["metrics_host"], port=kw["metrics_port"]),
        group=GroupConfig(replicas=kw["replicas"], spare=kw["spare"]),
        events_path=kw["events_file"], ready_file=kw["ready_file"],
        export_dir=kw["export_dir"], export_on_exit=kw["export_on_exit"],
    )


def _run_join(config: NodeConfig) -> None:
    from cfnode.bootstrap import join_hint
    from cfnode.net.dht import create_dht
    from cfnode.net.identity import open_identity
    from cfnode.net.validation import RunRecordValidator

    # The identity key signs our records (their subkey is its owner marker) and p2pd runs with it, so a record's
    # subkey proves which peer wrote it (docs/protocol.md, signed records). A temporary one without --identity-path.
    identity = open_identity(config.network.identity_path)
    validators = [identity.signature_validator(),
                  RunRecordValidator(config.run_id, config.model.num_stages, ttl_s=config.heartbeat.ttl_s)]
    dht = create_dht(config.network, validators=validators, identity=identity)  # FIRST: it forks
    from cfnode.node import Node  # torch-heavy imports after the fork

    def on_ready(info: dict[str, Any]) -> None:
        click.echo(join_hint(info["maddrs"]))
        click.echo(f"stage {info['stage']} ONLINE as {info['peer_id']}; metrics port {info['metrics_port']}")
        sys.stdout.flush()
        if config.ready_file:
            _write_json_atomic(config.ready_file, info)

    from cfnode.net.dht import SwarmDHT, mirror_rejections
    from cfnode.net.network import P2PNetwork

    swarm = SwarmDHT(dht, run_id=config.run_id, num_stages=config.model.num_stages, ttl_s=config.heartbeat.ttl_s,
                     owner=identity.marker)
    node = Node(config, swarm, P2PNetwork(dht, config.network), on_ready=on_ready)

    async def _main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        loop.set_exception_handler(_quiet_disconnects)
        mirror = asyncio.create_task(mirror_rejections(swarm, node.metrics.mirror_dht_rejections,
                                                       period_s=max(1.0, config.heartbeat.period_s)))
        try:
            await node.run()  # stage 0 returns at --max-steps (after exporting, with --export-dir)
        finally:
            mirror.cancel()

    try:
        run_loop(_main(), config.network.event_loop)
    except (asyncio.CancelledError, KeyboardInterrupt):
        logger.info("stopped")
    finally:
        dht.shutdown()


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """hivemind's control client leaves a task failing with ConnectionResetError when p2pd goes away at
    shutdown; that is expected, so log it at DEBUG instead of as an error with a traceback."""
    exc = context.get("exception")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        logger.debug("connection closed: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def _dump_tasks() -> None:
    """SIGUSR1: log every asyncio task's stack (diagnosing a stuck node without a debugger)."""
    import io

    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(file=buf)
        logger.warning("task %s:\n%s", task.get_name(), buf.getvalue())


@main.command()
@click.option("--peers", "--initial-peers", "peers", multiple=True, required=True)
@click.option("--run-id", default=_D.run_id)
@click.option("--json", "as_json", is_flag=True, envvar="CFNODE_STATUS_JSON", help="Print JSON instead of a table.")
@click.option("--heartbeat-ttl", type=float, default=_H.ttl_s, help="The run's ttl (for record ages).")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Redraw every SECONDS (2 if omitted) until Ctrl-C; with --json, one JSON "
                                        "object per line.")
@click.option("--count", type=click.IntRange(min=1), default=None, hidden=True, help="--watch: stop after N frames.")
@_with(logging_options)
def status(peers: tuple[str, ...], run_id: str, as_json: bool, heartbeat_ttl: float, watch: float | None,
           count: int | None, log_level: str, log_format: str) -> None:
    """Show the stage map of a run as read from the DHT: stages, spares (STANDBY), rebuilds in progress."""
    from contextlib import closing

    from cfnode.status import read_status, render_frame, render_table, watch_status

    setup_logging("WARNING" if log_level.upper() == "INFO" else log_level, log_format)
    peers = _checked_peers(peers)
    try:
        if watch is None:
            snapshot = read_status(peers, run_id, ttl_s=heartbeat_ttl)
            if "error" in snapshot:
                click.echo(f"error: {snapshot['error']}", err=True)
                sys.exit(1)
            click.echo(json.dumps(snapshot, indent=2) if as_json else render_table(snapshot))
            return
        clear = not as_json and sys.stdout.isatty()
        frames = watch_status(peers, run_id, ttl_s=heartbeat_ttl, interval_s=watch, count=count)
        with closing(frames):
            for snapshot in frames:
                click.echo(json.dumps(snapshot) if as_json else render_frame(snapshot, interval_s=watch, clear=clear))
                sys.stdout.flush()
    except CfnodeError as e:
        _fail(e)
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--peers", "--initial-peers", "peers", multiple=True, required=True,
              help="Multiaddr of a running peer of the swarm (repeatable).")
@click.option("--run-id", default=_D.run_id)
@click.option("--out", "out_dir", required=True, help="Directory to write the checkpoint to (replaced if an export).")
@click.option("--identity-path", default="export.id",
              help="Persistent identity of the exporter (created if absent); nodes allow its peer id with "
                   "--weights-reader.")
@click.option("--preset", "preset_name", default=None, type=click.Choice(sorted(PRESETS)),
              help="The run's preset (default: the preset matching the run's config hash).")
@click.option("--stages", type=int, default=None, help="The run's transformer stages (default: the run's).")
@click.option("--model-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="The checkpoint the run was started from (its config and tokenizer).")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="tokenizer.json the run trained with (default: the checkpoint's, else the shipped one).")
@click.option("--seed", "data_seed", type=int, default=None, help="The run's data seed, recorded in cfnode.json.")
@click.option("--heartbeat-ttl", "ttl_s", type=float, default=_H.ttl_s, help="The run's ttl (paces retried downloads).")
@click.option("--host-maddrs", multiple=True, default=("/ip4/0.0.0.0/tcp/0",))
@_with(logging_options)
def export(peers: tuple[str, ...], out_dir: str, log_level: str, log_format: str, **kw: Any) -> None:
    """Fetch every stage of a live run at one committed step and write a Hugging Face checkpoint."""
    from cfnode.export import ExportOptions, ProgressBar, export_peer_id, export_swarm

    setup_logging(log_level, log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peers = _checked_peers(peers)
    try:
        options = ExportOptions(peers=peers, out_dir=out_dir, **kw)
        click.echo(f"exporting as peer {export_peer_id(options.identity_path)} "
                   f"(nodes allow it with --weights-reader)", err=True)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    progress = ProgressBar()
    try:
        info = export_swarm(options, on_start=progress.start, on_fetched=progress.fetched)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    except CfnodeError as e:
        _fail(e)
    finally:
        progress.close()
    click.echo(f"exported step {info['step']} of run {info['run_id']} to {out_dir}")
    click.echo(f"  try: cfnode generate --model {out_dir} --prompt 'ROMEO:'")


@main.command()
@click.option("--model", "model_dir", required=True, help="An exported (or any local Llama) checkpoint directory.")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64)
@click.option("--temperature", type=float, default=0.8, help="0: greedy.")
@click.option("--top-k", type=int, default=50, help="Sample among the k most likely tokens (0: all).")
@click.option("--seed", type=int, default=0, help="Same seed, same text.")
@_with(logging_options)
def generate(log_level: str, log_format: str, **kw: Any) -> None:
    """Generate text from an exported checkpoint (plain transformers)."""
    from cfnode.generate import GenerateOptions, generate_text

    setup_logging("WARNING" if log_level.upper() == "INFO" else log_level, log_format)
    try:
        click.echo(generate_text(GenerateOptions(**kw)))
    except ConfigError as e:
        raise click.UsageError(str(e)) from e


@main.command()
@click.option("--stages", type=int, default=4, help="Transformer stages L (the demo runs stage 0 plus L).")
@click.option("--steps", type=int, default=300)
@click.option("--preset", "preset_name", default="small", type=click.Choice(sorted(PRESETS)),
              envvar="CFNODE_DEMO_PRESET")
@click.option("--workdir", default=None, help="Where logs, events and identities go (default: a temp dir).")
@click.option("--json-summary", default=None, help="Write a JSON summary of the run here.")
@click.option("--spares", type=int, default=1, help="Spare nodes to start.")
@click.option("--microbatches", type=int, default=_T.num_microbatches)
@click.option("--microbatch-size", type=int, default=_T.microbatch_size)
@click.option("--lr", type=float, default=_T.lr)
@click.option("--val-every", type=int, default=_T.val_every)
@click.option("--heartbeat-period", type=float, default=_H.period_s)
@click.option("--heartbeat-ttl", type=float, default=_H.ttl_s)
@click.option("--replicas", type=int, default=1,
              help="Members (1..16) of every stage's group, passed to every node as `join --replicas` (stage 0 "
                   "included: its lead drives, the others take over if it dies).")
@click.option("--kill", multiple=True,
              help="STAGE@STEP: SIGKILL that stage's process at that step (repeatable). With --replicas > 1: one "
                   "member of the stage's group; the group carries on, nothing is rebuilt.")
@click.option("--kill-group", multiple=True,
              help="STAGE@STEP: SIGKILL every member of that stage's group at that step, so a spare rebuilds it "
                   "with CheckFree (repeatable; needs --spares >= 1; with --replicas 1 the same as --kill).")
@click.option("--recovery-rule", default="grad-avg", type=click.Choice(["grad-avg", "uniform-avg", "copy", "random"]))
@click.option("--recovery", default="checkfree", type=click.Choice(list(RECOVERY_MODES)),
              help="checkfree+ (needs --stages >= 4) also survives the loss of stage 0 and the edge stages; "
                   "checkpoint and redundant are baselines.")
@click.option("--checkpoint-every", type=int, default=50, help="With --recovery checkpoint: save every N steps.")
@click.option("--export-dir", default=None, help="Where the trained model is written (default: WORKDIR/export).")
@click.option("--prompt", default="ROMEO.", help="Prompt of the sample printed at the end.")
@click.option("--seed", type=int, default=0, help="`join --seed` and `--init-seed` of every node.")
@click.option("--device", default="cpu", help="`join --device` of every node: auto, cpu, cuda, cuda:N or mps.")
@click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="float32",
              help="`join --compute-dtype` of every node.")
@click.option("--wire-dtype", type=click.Choice(list(WIRE_DTYPES)), default="float32",
              help="`join --wire-dtype` of every node.")
@_with(logging_options)
def demo(**kw: Any) -> None:
    """Start a bootstrap, L+1 stage nodes (with --replicas K: K members for each of stages 1..L) and a spare on
    127.0.0.1 and train on the embedded corpus."""
    from cfnode.demo import DemoOptions, run_demo

    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    kw["device"] = _checked_device(kw["device"])
    try:
        options = DemoOptions(**kw)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    sys.exit(run_demo(options))


@main.command()
@click.option("--strategies", default="none,checkfree,checkfree+",
              help="Comma-separated: none, checkfree, checkfree+, uniform-avg, copy, random, checkpoint, redundant.")
@click.option("--rates", default="5,10,16", help="Hourly failure rates of one stage in percent, comma-separated.")
@click.option("--probabilities", default="",
              help="Per-stage, per-step failure probabilities instead of --rates, comma-separated.")
@click.option("--steps", type=int, default=300, help="Steps per run.")
@click.option("--out", default="experiment", help="Directory for results.*, loss_vs_time.png, schedules.json, runs/.")
@click.option("--seed", type=int, default=0,
              help="Seed of the failure schedule, the data order and the initial weights (`join --seed`, --init-seed).")
@click.option("--preset", "preset_name", default="small", type=click.Choice(sorted(PRESETS)))
@click.option("--stages", type=int, default=4, help="Transformer stages L (each run has stages 0..L).")
@click.option("--spares", type=int, default=2, help="Spares started with each swarm.")
@click.option("--microbatches", type=int, default=_T.num_microbatches)
@click.option("--microbatch-size", type=int, default=_T.microbatch_size)
@click.option("--lr", type=float, default=_T.lr)
@click.option("--val-every", type=int, default=10)
@click.option("--heartbeat-period", type=float, default=_H.period_s)
@click.option("--heartbeat-ttl", type=float, default=_H.ttl_s)
@click.option("--checkpoint-every", type=int, default=50, help="Strategy checkpoint: save every N steps.")
@click.option("--compression", type=float, default=None,
              help="Time-compression factor c (default: c = --reference-step-time / T).")
@click.option("--reference-step-time", "reference_step_s", type=float, default=90.0,
              help="Without --compression: the seconds one step stands for (c * T).")
@click.option("--step-time", "step_time_s", type=float, default=None,
              help="T in seconds (default: measured on the 'none' run or a warm-up run).")
@click.option("--warmup-steps", type=int, default=20, help="Length of the warm-up run that measures T if needed.")
@click.option("--min-gap", type=int, default=10, help="Minimum steps between two injected failures.")
@click.option("--max-per-step", type=int, default=1, help="Most failures injected in one step.")
@click.option("--target", "target_val_loss", type=float, default=None,
              help="Target validation loss (default: the 'none' run's final one + 2%).")
@click.option("--replay", default=None, type=click.Path(exists=True, dir_okay=False),
              help="schedules.json of an earlier experiment (or one schedule's JSON) to replay.")
@click.option("--replicas", type=int, default=1,
              help="Members (1..16) of every stage's group (`join --replicas` on every node). Each member fails "
                   "on its own; a stage is lost only when all of its members fail in one step (p^K); killed "
                   "members are replaced by exact copies.")
@click.option("--device", default="cpu", help="`join --device` of every node: auto, cpu, cuda, cuda:N or mps.")
@click.option("--compute-dtype", type=click.Choice(list(COMPUTE_DTYPES)), default="float32",
              help="`join --compute-dtype` of every node.")
@click.option("--wire-dtype", type=click.Choice(list(WIRE_DTYPES)), default="float32",
              help="`join --wire-dtype` of every node.")
@click.option("--engine", type=click.Choice(ENGINES), default="swarm",
              help="swarm: each run a fresh swarm of processes on 127.0.0.1; local: the same nodes in one process "
                   "on virtual time (loss curves only: its step times are not measured).")
@click.option("--jobs", type=int, default=1,
              help="Runs at once, each in its own process (--engine local only). An experiment run again into the "
                   "same --out reuses every run whose result file matches its settings (runs/NAME/record.json).")
@_with(logging_options)
def experiment(**kw: Any) -> None:
    """Run recovery strategies on fresh local swarms under one seeded failure schedule; write a report."""
    from cfnode.experiment.runner import ExperimentOptions, parse_floats, run_experiment, split_csv

    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    kw["device"] = _checked_device(kw["device"])
    try:
        kw["strategies"] = split_csv(kw["strategies"])
        kw["probabilities"] = parse_floats(kw["probabilities"], "--probabilities")
        kw["rates"] = () if kw["probabilities"] else parse_floats(kw["rates"], "--rates")
        options = ExperimentOptions(**kw)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    try:
        code = run_experiment(options)
    except CfnodeError as e:
        _fail(e)
        return
    sys.exit(code)


@main.command("ablation-report")
@click.argument("experiments", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--raw", "raw_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Rebuild the report from a raw.json written earlier instead of experiment directories.")
@click.option("--out", required=True, help="Directory for raw.json, ablation.md, ablation.json, ablation.png.")
@_with(logging_options)
def ablation_report(experiments: tuple[str, ...], raw_path: str | None, out: str, **kw: Any) -> None:
    """Combine `cfnode experiment` outputs of one configuration, one per --seed, into the rule ablation report
    (means and 95 % intervals over seeds; docs/experiments.md)."""
    from cfnode.experiment import ablation

    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    if bool(experiments) == bool(raw_path):
        raise click.UsageError("give either experiment directories or --raw, not both or neither")
    try:
        if raw_path:
            with open(raw_path, encoding="utf-8") as f:
                raw = json.load(f)
        else:
            raw = ablation.read_experiments(experiments)
    except (OSError, ValueError, KeyError) as e:
        raise click.UsageError(f"cannot read the experiments: {e}") from e
    for path in ablation.write(out, raw).values():
        click.echo(path)


@main.command("table2-report")
@click.option("--curves", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="`cfnode experiment --engine local` output with none, checkfree and checkfree+ at "
                   "--probabilities 0.0009,0.002,0.004 (repeatable: one per seed).")
@click.option("--costs", required=True, type=click.Path(exists=True, file_okay=False),
              help="`cfnode experiment --engine swarm` output with checkfree, checkfree+, checkpoint and redundant.")
@click.option("--model-step-time", type=float, default=90.0, show_default=True,
              help="Seconds one modelled step takes (the paper's 500M model: ~90 s).")
@click.option("--target", type=float, default=None, help="Target validation loss (default: failure-free final + 2%).")
@click.option("--out", required=True, help="Directory for table2.md and table2.json.")
@_with(logging_options)
def table2_report(curves: tuple[str, ...], costs: str, model_step_time: float, target: float | None, out: str,
                  **kw: Any) -> None:
    """The paper's Table 2 (hours to a target validation loss at 5, 10 and 16 %/h) from the local engine's loss
    curves and the costs measured on a real swarm (docs/experiments.md, "Table 2")."""
    from cfnode.experiment import table2

    setup_logging(kw.pop("log_level"), kw.pop("log_format"))
    try:
        t = table2.read(curves, costs, model_step_s=model_step_time, target=target)
    except (OSError, ValueError, KeyError) as e:
        raise click.UsageError(f"cannot build the table: {e}") from e
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table2.json"), "w", encoding="utf-8") as f:
        json.dump(t, f, indent=1, default=str)
    with open(os.path.join(out, "table2.md"), "w", encoding="utf-8") as f:
        f.write(table2.markdown(t))
    click.echo(os.path.join(out, "table2.md"))


if __name__ == "__main__":
    main()
