"""The one frozen configuration tree, built in `cli.py` and handed down in parts.

Each component receives only its own sub-config (`ModelConfig`, `TrainConfig`, ...). Validation happens in
`__post_init__` and raises `ConfigError`, whose message names the offending field. This module owns no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from cfnode.device import check_compute_dtype, parse_device
from cfnode.errors import ConfigError

EVENT_LOOPS = ("uvloop", "asyncio")
WIRE_DTYPES = ("float32", "float16", "bfloat16", "uint8")
"""`--wire-dtype` choices (cfnode/net/wire.py)."""
ENGINES = ("swarm", "local")
"""`cfnode experiment --engine`: real processes on 127.0.0.1, or the same nodes in one process (experiment/localrun.py)."""

PROTOCOL_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the LLaMA model and how it is cut into stages.

    Stage 0 holds the embedding, final norm, LM head and loss; stages 1..num_stages hold `layers_per_stage`
    decoder layers each.
    """

    preset: str = "custom"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_heads: int = 4
    num_kv_heads: int = 4
    num_stages: int = 4
    """L, the number of transformer stages (the swarm has L + 1 stages counting stage 0)."""
    layers_per_stage: int = 2
    seq_len: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_seed: int = 0
    """Seed of the initial weights; every node derives its slice from the same seeded full model."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                     "num_stages", "layers_per_stage", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")

    @property
    def num_layers(self) -> int:
        return self.num_stages * self.layers_per_stage

    def config_hash(self) -> str:
        """A short stable hash of everything that must agree between nodes of one run (not the preset name)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset"}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(preset="tiny", vocab_size=4096, hidden_size=64, intermediate_size=128, num_heads=4,
                        num_kv_heads=4, num_stages=3, layers_per_stage=1, seq_len=32),
    "small": ModelConfig(preset="small", vocab_size=4096, hidden_size=256, intermediate_size=688, num_heads=4,
                         num_kv_heads=4, num_stages=4, layers_per_stage=2, seq_len=128),
    "medium": ModelConfig(preset="medium", vocab_size=4096, hidden_size=512, intermediate_size=1376, num_heads=8,
                          num_kv_heads=8, num_stages=4, layers_per_stage=3, seq_len=128),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """Return a preset, optionally with fields replaced (e.g. `num_stages`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[name]
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str | None = None
    """None: the embedded Shakespeare corpus. A path: local text files. Otherwise a local `datasets` name."""
    seed: int = 0
    """Microbatches of step s are a pure function of (seed, s)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    lr: float = 1e-3
    num_microbatches: int = 4
    """M, microbatches per optimizer step."""
    microbatch_size: int = 8
    max_in_flight: int = 4
    """How many microbatches stage 0 keeps in the ring at once."""
    clip_norm: float = 1.0
    max_steps: int | None = None
    start_step: int = 0
    """The step the run starts at: 0, or an export's step when every node starts from it (--model-path of a
    `cfnode export`). The data order continues from it (batches are a function of seed and step)."""
    """Stage 0 stops driving after this many committed steps (None: run until stopped)."""
    val_every: int = 25
    """Run validation on the held-out split every this many steps (0 disables)."""
    val_batches: int = 4
    step_timeout_s: float = 60.0
    """Stage 0 aborts a step whose microbatches have not all come back within this time."""
    retry_backoff_s: float = 0.5
    num_threads: int = 1
    """torch intra-op threads of this node's compute thread."""
    device: str = "cpu"
    """Where this node's stage, its gradients and Adam state live and compute (`--device`, resolved by the CLI:
    cpu, cuda:N, mps; meta in tests). Per node: stages of one run may sit on different devices."""
    compute_dtype: str = "float32"
    """`--compute-dtype`: float32, or autocast to bfloat16/float16 over float32 master weights and Adam state
    (cfnode/device.py). Run-wide (the run's MetaRecord carries it)."""
    debug_hold_at_step: int | None = None
    """Test seam: stage 0 stops driving (and holds, still serving RPCs) before this step."""
    debug_kill_mid_step: int | None = None
    """Test seam: a transformer stage SIGKILLs itself when, this many steps after it built or joined its stage
    (or later), a training hop reaches it while it holds a microbatch's activations (killed mid-step, for sure)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("num_microbatches", "microbatch_size", "max_in_flight", "num_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.start_step < 0:
            raise ConfigError(f"train.start_step must be >= 0, got {self.start_step}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.step_timeout_s <= 0:
            raise ConfigError(f"train.step_timeout_s must be > 0, got {self.step_timeout_s}")
        if parse_device(self.device) in ("auto", "cuda"):
            raise ConfigError(f"train.device must be a concrete device (cpu, cuda:N, mps), got {self.device!r}; "
                              "resolve --device first (cfnode.device.probe_device)")
        check_compute_dtype(self.compute_dtype)


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    request_timeout_s: float = 30.0
    """Timeout of one forward/backward push (opening the stream and each reply part)."""
    ping_timeout_s: float = 3.0
    part_timeout_s: float = 10.0
    """Incoming streams: the longest wait for any one part (the first included); a stall is rejected `timeout`."""
    max_message_bytes: int = 64 * 2**20
    """Upper bound of one incoming hop stream (a hop is also capped at its tensor's exact size); longer streams
    are rejected while they arrive."""
    chunk_bytes: int = 2**20
    startup_timeout_s: float = 30.0
    weights_readers: tuple[str, ...] = ()
    """Peer ids (base58) outside the run that may fetch weights (`rpc_get_weights`): an operator's exporter or
    auditor. Ring members and spares always may; nobody else."""
    wire_dtype: str = "float32"
    """`--wire-dtype`: how activations and gradients travel (float32 exact; float16, bfloat16, uint8 compressed,
    net/wire.py). Run-wide (the run's MetaRecord carries it); weights always travel exactly."""
    event_loop: str = "asyncio"
    """`--event-loop`: the node process's asyncio loop, the standard library's or uvloop (libuv; not the default until
    measured against it and run through the fault tests)."""

    def __post_init__(self) -> None:
        for maddr in self.announce_maddrs:
            if maddr.rstrip("/").endswith("/tcp/0"):
                raise ConfigError(f"announce_maddrs needs an explicit port, got {maddr!r}")
        if self.chunk_bytes > 2**20:
            raise ConfigError("network.chunk_bytes must be <= 1 MiB")
        if self.part_timeout_s <= 0:
            raise ConfigError(f"network.part_timeout_s must be > 0, got {self.part_timeout_s}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"network.wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"network.event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")


@dataclass(frozen=True, kw_only=True)
class HeartbeatConfig:
    period_s: float = 2.0
    """How often a node re-announces its record."""
    ttl_s: float = 8.0
    """A record not refreshed for this long expires: its node is considered gone."""
    claim_jitter_s: float = 1.0
    """Upper bound of the random wait between writing JOINING and re-reading (ARCHITECTURE §5)."""

    def __post_init__(self) -> None:
        if self.period_s <= 0:
            raise ConfigError(f"heartbeat period must be > 0, got {self.period_s}")
        if self.ttl_s <= self.period_s:
            raise ConfigError(f"heartbeat ttl ({self.ttl_s}) must exceed the period ({self.period_s})")


RECOVERY_MODES = ("checkfree", "checkfree+", "checkpoint", "redundant")
"""`checkpoint` and `redundant` are the baselines of `cfnode experiment` (docs/experiments.md)."""


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    mode: str = "checkfree"
    """`checkfree`: rebuild intermediate stages from both neighbours, copy edge stages, stage 0 unrecoverable.
    `checkfree+`: swap stages 1<->2 and L-1<->L on odd microbatches, rebuild those by copying the swap
    partner, and keep replicas of stage 0 (embedding, final norm, head) on stages 1 and L (needs L >= 4).
    `checkpoint`: every `checkpoint_every` steps each stage saves weights + Adam state to `checkpoint_dir`; a
    lost stage makes the whole swarm roll back to the newest complete checkpoint.
    `redundant` (Bamboo-style): each stage keeps a shadow copy of its ring successor, pushed after every
    commit, and runs the successor's forward redundantly; a lost stage is restored from its shadow."""
    rule: str = "grad-avg"
    """How a lost stage is rebuilt: grad-avg (CheckFree), uniform-avg, copy, random (ablations)."""
    lr_scale: float = 1.1
    """The rebuilt stage's fresh Adam runs at lr * lr_scale for the rest of training (reference code: 1.1)."""
    norm_power: float = 1.0
    """Exponent p of the gradient-norm weights (the reference code uses p = 1)."""
    fetch_timeout_s: float = 60.0
    audit_dir: str | None = None
    """Write every rebuild's inputs and output here (for verification; costs a copy of three stages)."""
    debug_stall_s: float = 0.0
    """Test seam: pause this long between fetching and installing, so a test can kill a rebuilding node."""
    checkpoint_dir: str | None = None
    """`checkpoint` mode: the store every node of the (one-machine) swarm reads and writes."""
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.mode not in RECOVERY_MODES:
            raise ConfigError(f"--recovery must be one of {', '.join(RECOVERY_MODES)}, got {self.mode!r}")
        if self.rule not in ("grad-avg", "uniform-avg", "copy", "random"):
            raise ConfigError(f"--recovery-rule must be grad-avg, uniform-avg, copy or random, got {self.rule!r}")
        if self.lr_scale <= 0:
            raise ConfigError(f"--lr-scale must be > 0, got {self.lr_scale}")
        if self.mode == "checkpoint" and not self.checkpoint_dir:
            raise ConfigError("--recovery checkpoint needs --checkpoint-dir (a directory every node can reach)")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """Stage groups (docs/architecture.md "Stage groups"): several peers hold one stage, train it data-parallel
    and average their gradients each step with hivemind's all-reduce."""

    replicas: int = 1
    """The most members a stage group may have; run-wide. 1: one peer per stage (every other node is a spare)."""
    spare: bool = False
    """Wait as STANDBY instead of joining a live group or claiming a stage before the swarm has trained (a spare
    rebuilds a stage whose group is empty)."""
    join_timeout_s: float = 30.0
    """How long stage 0 holds the ring at a step boundary for a newcomer to copy a member's state."""
    averaging_timeout_s: float = 5.0
    """A group's all-reduce of one step must finish within this (else the attempt aborts and is retried)."""
    matchmaking_s: float = 2.0
    """hivemind's min_matchmaking_time: how long a member waits for the rest of its group to show up (a round
    starts as soon as the whole group is in); each join request may take half of it. At 0.5 s (0.25 s per
    request) the rounds of 9 nodes on 2 cores kept failing ("could not find a group")."""

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= 16:
            raise ConfigError(f"--replicas must be 1..16, got {self.replicas}")


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int | None = None
    """None: no HTTP exporter. 0: any free port (reported in the ready file)."""


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    run_id: str = "cfnode"
    stage: int | None = None
    """None means `auto`: the lowest empty stage, else STANDBY."""
    model: ModelConfig = field(default_factory=lambda: PRESETS["small"])
    model_path: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    events_path: str | None = None
    """Append one JSON line per swarm event (joined, claimed, step aborted, ...) to this file."""
    ready_file: str | None = None
    """Write {peer_id, maddrs, metrics_port, ...} as JSON here once the node serves RPCs."""
    export_dir: str | None = None
    """Stage 0 only: write the whole model (a Hugging Face checkpoint, `cfnode/export.py`) here when the driver
    reaches `train.max_steps` (and on SIGTERM with `export_on_exit`)."""
    export_on_exit: bool = False
    """Also export to `export_dir` when stopped by SIGTERM/SIGINT (at the last committed step)."""

    def __post_init__(self) -> None:
        if self.export_on_exit and not self.export_dir:
            raise ConfigError("--export-on-exit needs --export-dir")
        if not self.run_id or ":" in self.run_id:
            raise ConfigError(f"run_id must be non-empty and contain no ':', got {self.run_id!r}")
        if self.stage is not None and not 0 <= self.stage <= self.model.num_stages:
            raise ConfigError(f"--stage must be auto or 0..{self.model.num_stages}, got {self.stage}")
        if self.recovery.mode == "checkfree+" and self.model.num_stages < 4:
            raise ConfigError(f"--recovery checkfree+ swaps stages 1<->2 and L-1<->L, so it needs --stages >= 4; "
                              f"this run has {self.model.num_stages}")

    @property
    def swaps(self) -> bool:
        """CheckFree+ out-of-order execution is on."""
        return self.recovery.mode == "checkfree+"
