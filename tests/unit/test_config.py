"""The frozen configuration tree (cfnode.config): presets, the run-wide model hash, validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from cfnode.config import (
    PRESETS,
    DataConfig,
    HeartbeatConfig,
    MetricsConfig,
    ModelConfig,
    NetworkConfig,
    NodeConfig,
    TrainConfig,
    preset,
)
from cfnode.errors import ConfigError


def test_tiny_preset() -> None:
    tiny = PRESETS["tiny"]
    assert tiny.preset == "tiny"
    assert (tiny.hidden_size, tiny.num_stages, tiny.layers_per_stage) == (64, 3, 1)
    assert tiny.num_layers == 3


def test_small_preset() -> None:
    small = PRESETS["small"]
    assert small.preset == "small"
    assert (small.hidden_size, small.num_heads, small.num_stages, small.layers_per_stage) == (256, 4, 4, 2)
    assert (small.seq_len, small.vocab_size) == (128, 4096)
    assert small.num_layers == 8


def test_preset_override() -> None:
    cfg = preset("small", num_stages=2)
    assert cfg.num_stages == 2 and cfg.num_layers == 4
    assert dataclasses.replace(cfg, num_stages=4) == PRESETS["small"]
    assert PRESETS["small"].num_stages == 4  # the table itself is untouched
    assert preset("tiny", num_stages=None) == PRESETS["tiny"]  # None means "keep the preset's value"
    assert preset("tiny") == PRESETS["tiny"]


def test_preset_override_is_validated() -> None:
    with pytest.raises(ConfigError, match="num_stages"):
        preset("tiny", num_stages=0)


def test_unknown_preset_names_choices() -> None:
    with pytest.raises(ConfigError) as exc:
        preset("huge")
    msg = str(exc.value)
    assert "huge" in msg and "tiny" in msg and "small" in msg


def test_config_hash_stable_and_ignores_preset_name() -> None:
    a = preset("small")
    b = ModelConfig(**{**dataclasses.asdict(PRESETS["small"]), "preset": "custom"})
    assert a.config_hash() == PRESETS["small"].config_hash()
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() == dataclasses.replace(a, preset="anything").config_hash()
    h = a.config_hash()
    assert isinstance(h, str) and len(h) == 16 and int(h, 16) >= 0
    assert PRESETS["tiny"].config_hash() != PRESETS["small"].config_hash()


@pytest.mark.parametrize(("name", "value"), [
    ("vocab_size", 4097), ("hidden_size", 512), ("intermediate_size", 689), ("num_heads", 8),
    ("num_kv_heads", 2), ("num_stages", 2), ("layers_per_stage", 1), ("seq_len", 64),
    ("rms_norm_eps", 1e-6), ("rope_theta", 500000.0), ("init_seed", 1),
])
def test_config_hash_changes_with_every_shape_field(name: str, value: object) -> None:
    base = PRESETS["small"]
    assert getattr(base, name) != value
    assert dataclasses.replace(base, **{name: value}).config_hash() != base.config_hash()


def test_config_hash_covers_every_field_but_preset() -> None:
    """A new ModelConfig field must either be hashed or be deliberately excluded like `preset`."""
    hashed = {f.name for f in dataclasses.fields(ModelConfig)} - {"preset"}
    assert hashed == {"vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                      "num_stages", "layers_per_stage", "seq_len", "rms_norm_eps", "rope_theta", "init_seed"}


@pytest.mark.parametrize(("build", "field_name"), [
    (lambda: ModelConfig(hidden_size=250, num_heads=4), "hidden_size"),
    (lambda: ModelConfig(num_heads=4, num_kv_heads=3), "num_heads"),
    (lambda: ModelConfig(seq_len=0), "seq_len"),
    (lambda: ModelConfig(num_stages=0), "num_stages"),
    (lambda: TrainConfig(lr=0), "lr"),
    (lambda: TrainConfig(num_microbatches=0), "num_microbatches"),
    (lambda: TrainConfig(max_in_flight=0), "max_in_flight"),
    (lambda: TrainConfig(max_steps=-1), "max_steps"),
    (lambda: TrainConfig(step_timeout_s=0), "step_timeout_s"),
    (lambda: HeartbeatConfig(period_s=5, ttl_s=2), "ttl"),
    (lambda: HeartbeatConfig(period_s=2, ttl_s=2), "ttl"),
    (lambda: HeartbeatConfig(period_s=0), "period"),
    (lambda: NetworkConfig(announce_maddrs=("/ip4/1.2.3.4/tcp/0",)), "announce_maddrs"),
    (lambda: NetworkConfig(announce_maddrs=("/ip4/1.2.3.4/tcp/0/",)), "announce_maddrs"),
    (lambda: NetworkConfig(chunk_bytes=2**20 + 1), "chunk_bytes"),
    (lambda: NodeConfig(model=PRESETS["tiny"], stage=4), "stage"),
    (lambda: NodeConfig(model=PRESETS["tiny"], stage=-1), "stage"),
    (lambda: NodeConfig(run_id="a:b"), "run_id"),
    (lambda: NodeConfig(run_id=""), "run_id"),
])
def test_validation_errors_name_the_field(build: object, field_name: str) -> None:
    with pytest.raises(ConfigError, match=field_name):
        build()  # type: ignore[operator]


def test_config_error_is_value_error_with_usage_exit_code() -> None:
    with pytest.raises(ValueError):
        ModelConfig(hidden_size=250)
    assert ConfigError.exit_code == 2


def test_valid_edge_values_accepted() -> None:
    assert NodeConfig(model=PRESETS["tiny"], stage=3).stage == 3  # stage L is valid
    assert NodeConfig(model=PRESETS["tiny"], stage=0).stage == 0
    assert NetworkConfig(announce_maddrs=("/ip4/1.2.3.4/tcp/31337",)).announce_maddrs
    assert NetworkConfig(announce_maddrs=("/ip4/1.2.3.4/tcp/10",)).announce_maddrs  # ends in 0, not port 0
    assert HeartbeatConfig(period_s=1, ttl_s=1.5).ttl_s == 1.5
    assert ModelConfig(num_heads=4, num_kv_heads=2).num_kv_heads == 2
    assert TrainConfig(max_steps=0).max_steps == 0


@pytest.mark.parametrize(("obj", "attr", "value"), [
    (PRESETS["tiny"], "hidden_size", 128),
    (TrainConfig(), "lr", 1.0),
    (NetworkConfig(), "chunk_bytes", 1),
    (HeartbeatConfig(), "ttl_s", 1.0),
    (DataConfig(), "seed", 3),
    (MetricsConfig(), "port", 1),
    (NodeConfig(), "stage", 1),
])
def test_configs_are_frozen(obj: object, attr: str, value: object) -> None:
    before = getattr(obj, attr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, attr, value)
    assert getattr(obj, attr) == before


def test_node_config_defaults_are_independent() -> None:
    a, b = NodeConfig(), NodeConfig()
    assert a == b
    assert a.model == PRESETS["small"]
    assert a.heartbeat.ttl_s > a.heartbeat.period_s
