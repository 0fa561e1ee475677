"""The `cfnode` command line (cfnode.cli): usage errors that exit before any networking, help texts, env vars.

No node is started: every invocation here must fail validation first. `_run_join` and `run_demo` are
replaced by tripwires so a regression that lets an invalid config through fails loudly instead of
starting a DHT.
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner, Result

from cfnode import cli
from cfnode.errors import ConfigError
from cfnode.net.peers import parse_peers, split_peers

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"
PEER2 = "/ip4/127.0.0.1/tcp/31338/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


@pytest.fixture(autouse=True)
def _no_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "setup_logging", lambda *a, **k: None)  # keep the test process' root logger

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the command got past validation and tried to start networking")

    monkeypatch.setattr(cli, "_run_join", tripwire)
    import cfnode.demo

    monkeypatch.setattr(cfnode.demo, "run_demo", tripwire)
    for var in ("CFNODE_JOIN_STAGE", "CFNODE_JOIN_PEERS", "CFNODE_JOIN_PRESET", "CFNODE_DEMO_STAGES"):
        monkeypatch.delenv(var, raising=False)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env)


def output(result: Result) -> str:
    # click >= 8.2 separates stderr; `output` has both there, only stdout before
    return result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_usage_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, output(result), result.exception)
    text = output(result)
    for needle in needles:
        assert needle in text, (needle, text)


def test_join_requires_peers() -> None:
    assert_usage_error(invoke("join"), "--peers")


def test_join_bad_stage() -> None:
    assert_usage_error(invoke("join", "--peers", PEER, "--stage", "foo"), "--stage", "foo")


def test_join_unknown_preset() -> None:
    assert_usage_error(invoke("join", "--peers", PEER, "--preset", "nope"), "--preset", "nope")


def test_join_stage_out_of_range() -> None:
    result = invoke("join", "--peers", PEER, "--stage", "99", "--preset", "tiny")
    assert_usage_error(result, "stage", "99")


def test_join_stage_out_of_range_with_stages_override() -> None:
    # --stages 2 makes 3 the first invalid index (the ring is 0..2)
    assert_usage_error(invoke("join", "--peers", PEER, "--stage", "3", "--preset", "tiny", "--stages", "2"),
                       "stage")


def test_join_ttl_not_above_period() -> None:
    result = invoke("join", "--peers", PEER, "--heartbeat-period", "5", "--heartbeat-ttl", "2")
    assert_usage_error(result, "ttl")


def test_join_announce_port_zero() -> None:
    result = invoke("join", "--peers", PEER, "--announce-maddrs", "/ip4/1.2.3.4/tcp/0")
    assert_usage_error(result, "announce")


def test_join_bad_run_id() -> None:
    assert_usage_error(invoke("join", "--peers", PEER, "--run-id", "a:b"), "run_id")


def test_join_valid_config_reaches_run_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """The positive control of the tripwire: a valid command line builds the NodeConfig and hands it on."""
    seen = []
    monkeypatch.setattr(cli, "_run_join", seen.append)
    result = invoke("join", "--peers", f"{PEER},{PEER2}", "--stage", "2", "--preset", "tiny", "--run-id", "r1")
    assert result.exit_code == 0, output(result)
    (config,) = seen
    assert config.stage == 2 and config.run_id == "r1" and config.model.preset == "tiny"
    assert config.network.initial_peers == (PEER, PEER2)


def test_demo_zero_stages() -> None:
    assert_usage_error(invoke("demo", "--stages", "0"), "--stages")


def test_demo_zero_steps() -> None:
    assert_usage_error(invoke("demo", "--steps", "0"), "--steps")


JOIN_FLAGS = ["--peers", "--stage", "--run-id", "--preset", "--model-path", "--data", "--identity-path",
              "--host-maddrs", "--announce-maddrs", "--metrics-host", "--metrics-port", "--heartbeat-period",
              "--heartbeat-ttl", "--log-level", "--log-format", "--device", "--compute-dtype"]
DEMO_FLAGS = ["--stages", "--steps", "--preset", "--workdir", "--json-summary", "--device", "--compute-dtype"]


@pytest.mark.parametrize(("command", "flags"), [("join", JOIN_FLAGS), ("demo", DEMO_FLAGS),
                                                ("bootstrap", ["--host-maddrs", "--announce-maddrs",
                                                               "--identity-path", "--metrics-host",
                                                               "--metrics-port"]),
                                                ("status", ["--peers", "--run-id", "--json", "--watch"])])
def test_help_lists_flags(command: str, flags: list[str]) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, output(result)
    for flag in flags:
        assert flag in result.output, flag


def test_main_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("bootstrap", "join", "status", "demo"):
        assert command in result.output


def test_env_var_is_read() -> None:
    result = invoke("join", "--peers", PEER, env={"CFNODE_JOIN_STAGE": "foo"})
    assert_usage_error(result, "--stage", "foo")


def test_env_var_peers_satisfies_required() -> None:
    # with peers from the environment the failure is the (invalid) stage, not a missing --peers
    result = invoke("join", "--stage", "foo", env={"CFNODE_JOIN_PEERS": PEER})
    assert_usage_error(result, "--stage")
    assert "Missing option" not in output(result)


@pytest.mark.parametrize(("given", "expected"), [
    ((), ()),
    (("a",), ("a",)),
    (("a,b",), ("a", "b")),
    (("a b",), ("a", "b")),
    ((" a ,, b\n\tc ", "d"), ("a", "b", "c", "d")),
    (("a", "b,c"), ("a", "b", "c")),
    ((",", " "), ()),
])
def test_split_peers(given: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert split_peers(given) == expected


BAD_PEERS = [
    "garbage",
    "/ip4/1.2.3.4/tcp/1",  # no /p2p/PEER_ID: hivemind's initial_peers need the peer id
    "/ip4/999.1.1.1/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",
    "/ip4/1.2.3.4/tcp/99999/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",
    "/ip4/1.2.3.4/tcp/1/p2p/QmExamplePeer",  # not a base58 multihash
    "/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco",  # no address to dial
    "/ip4/1.2.3.4/tcp/1/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco/tcp/2",  # the peer id must come last
    "/",
]


def test_parse_peers_accepts_peer_multiaddrs() -> None:
    dns = "/dns4/bootstrap/tcp/31337/p2p/QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"
    assert parse_peers((PEER, f"{PEER2}, {dns}")) == (PEER, PEER2, dns)


@pytest.mark.parametrize("bad", BAD_PEERS)
def test_parse_peers_rejects_a_bad_multiaddr_in_one_line(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_peers((PEER, bad))
    text = str(err.value)
    assert "\n" not in text and text.startswith("--peers ") and repr(bad) in text, text
    assert err.value.exit_code == 2


@pytest.mark.parametrize("given", [(",",), (" ", "")])
def test_parse_peers_rejects_no_address(given: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="--peers"):
        parse_peers(given)


def assert_one_line_peers_error(result: Result, bad: str) -> None:
    assert result.exit_code == 2, (result.exit_code, output(result), result.exception)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --peers "), result.stderr
    assert repr(bad) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", BAD_PEERS)
def test_join_bad_peers_is_one_line_exit_2(bad: str) -> None:
    assert_one_line_peers_error(invoke("join", "--peers", PEER, "--peers", bad), bad)


def test_join_bad_peers_from_the_environment() -> None:
    assert_one_line_peers_error(invoke("join", env={"CFNODE_JOIN_PEERS": "garbage"}), "garbage")


def test_status_bad_peers_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import cfnode.status

    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("status got past --peers validation and tried to read the DHT")

    monkeypatch.setattr(cfnode.status, "read_status", tripwire)
    monkeypatch.setattr(cfnode.status, "watch_status", tripwire)
    assert_one_line_peers_error(invoke("status", "--peers", "garbage"), "garbage")
    assert_one_line_peers_error(invoke("status", "--peers", "garbage", "--watch"), "garbage")


def test_join_bad_peers_as_a_process_prints_no_traceback() -> None:
    """The real entry point (`python -m cfnode`), logging and all: one line on stderr, exit 2."""
    from tests.support.swarm import run_cli

    out = run_cli("join", "--peers", "garbage", timeout_s=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--peers" in out.stderr and "garbage" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr


# -- --device and --compute-dtype ------------------------------------------------------------------------------


def test_join_device_cuda_without_cuda_is_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever it has
    result = invoke("join", "--peers", PEER, "--device", "cuda")
    assert result.exit_code == 2, (output(result), result.exception)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --device cuda"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu"])
def test_join_bad_device_string_is_one_line_exit_2(bad: str) -> None:
    result = invoke("join", "--peers", PEER, "--device", bad)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, output(result)
    assert result.stderr.startswith("error: --device must be one of") and repr(bad) in result.stderr


def test_join_device_and_compute_dtype_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    seen = []
    monkeypatch.setattr(cli, "_run_join", seen.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = invoke("join", "--peers", PEER, "--preset", "tiny", "--device", "auto", "--compute-dtype", "bfloat16")
    assert result.exit_code == 0, output(result)
    (config,) = seen
    assert (config.train.device, config.train.compute_dtype) == ("cpu", "bfloat16")
    seen.clear()
    assert invoke("join", "--peers", PEER, "--preset", "tiny").exit_code == 0
    assert (seen[0].train.device, seen[0].train.compute_dtype) == ("cpu", "float32")  # the defaults


def test_join_event_loop_reaches_the_config_and_a_bad_one_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(cli, "_run_join", seen.append)
    assert invoke("join", "--peers", PEER, "--preset", "tiny").exit_code == 0
    assert invoke("join", "--peers", PEER, "--preset", "tiny", "--event-loop", "uvloop").exit_code == 0
    assert [c.network.event_loop for c in seen] == ["asyncio", "uvloop"]  # the default, then the flag
    assert_usage_error(invoke("join", "--peers", PEER, "--event-loop", "trio"), "--event-loop", "trio")


def test_join_unknown_compute_dtype() -> None:
    assert_usage_error(invoke("join", "--peers", PEER, "--compute-dtype", "int8"), "--compute-dtype", "int8")


def test_demo_passes_device_and_compute_dtype_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import cfnode.demo

    seen = []
    monkeypatch.setattr(cfnode.demo, "run_demo", lambda options: seen.append(options) or 0)
    result = invoke("demo", "--device", "cpu", "--compute-dtype", "float16", "--steps", "3")
    assert result.exit_code == 0, output(result)
    assert (seen[0].device, seen[0].compute_dtype) == ("cpu", "float16")
    bad = invoke("demo", "--device", "gpu")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --device must be one of"), output(bad)


def test_the_wire_dtype_reaches_every_node_of_join_demo_and_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    import cfnode.demo
    import cfnode.experiment.runner

    seen: list = []
    monkeypatch.setattr(cli, "_run_join", seen.append)
    assert invoke("join", "--peers", PEER, "--preset", "tiny", "--wire-dtype", "uint8").exit_code == 0
    assert seen.pop().network.wire_dtype == "uint8"
    assert invoke("join", "--peers", PEER, "--preset", "tiny").exit_code == 0
    assert seen.pop().network.wire_dtype == "float32"  # the default
    assert_usage_error(invoke("join", "--peers", PEER, "--wire-dtype", "int4"), "--wire-dtype", "int4")
    monkeypatch.setattr(cfnode.demo, "run_demo", lambda options: seen.append(options) or 0)
    assert invoke("demo", "--wire-dtype", "bfloat16", "--steps", "3").exit_code == 0
    assert seen.pop().wire_dtype == "bfloat16"
    monkeypatch.setattr(cfnode.experiment.runner, "run_experiment", lambda options: seen.append(options) or 0)
    result = invoke("experiment", "--wire-dtype", "float16", "--compute-dtype", "bfloat16", "--device", "cpu")
    assert result.exit_code == 0, output(result)
    options = seen.pop()
    assert (options.wire_dtype, options.compute_dtype, options.device) == ("float16", "bfloat16", "cpu")
    bad = invoke("experiment", "--device", "gpu")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --device must be one of"), output(bad)


def test_join_device_cuda_as_a_process_prints_one_line() -> None:
    """The real entry point on this machine: `--device cuda:N` past the GPUs it has (any machine has fewer than
    10**6) exits 2 with one line naming --device."""
    from tests.support.swarm import run_cli

    out = run_cli("join", "--peers", PEER, "--device", "cuda:999999", timeout_s=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.splitlines()) == 1 and "--device cuda:999999" in out.stderr, out.stderr


def test_join_device_cuda_on_this_machine_prints_one_line() -> None:
    """`cfnode join --device cuda` as a process on a machine without CUDA: exit 2, one line naming --device."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tests.support.swarm import run_cli

    out = run_cli("join", "--peers", PEER, "--device", "cuda", timeout_s=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.splitlines() == [out.stderr.strip()] and "--device cuda" in out.stderr, out.stderr


def test_the_seed_reaches_the_initial_weights_and_data_order_of_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    import cfnode.demo
    from cfnode.demo import DemoOptions, run_flags

    seen: list = []
    monkeypatch.setattr(cli, "_run_join", seen.append)
    assert invoke("join", "--peers", PEER, "--preset", "tiny", "--seed", "3", "--init-seed", "5").exit_code == 0
    assert invoke("join", "--peers", PEER, "--preset", "tiny").exit_code == 0
    assert [(c.data.seed, c.model.init_seed) for c in seen] == [(3, 5), (0, 0)]  # the flags, then the defaults
    flags = run_flags(DemoOptions(seed=7), "/tmp/unused")
    assert flags[flags.index("--seed") + 1] == "7" and flags[flags.index("--init-seed") + 1] == "7"
    monkeypatch.setattr(cfnode.demo, "run_demo", lambda options: seen.append(options) or 0)
    assert invoke("demo", "--seed", "2", "--steps", "3").exit_code == 0
    assert seen.pop().seed == 2


def test_ablation_report_needs_experiments_or_raw_but_not_both(tmp_path: Any) -> None:
    assert_usage_error(invoke("ablation-report", "--out", str(tmp_path)), "--raw")
    raw = tmp_path / "raw.json"
    raw.write_text("{}")
    assert_usage_error(invoke("ablation-report", str(tmp_path), "--raw", str(raw), "--out", str(tmp_path)), "--raw")
    bad = invoke("ablation-report", str(tmp_path), "--out", str(tmp_path / "out"))  # no results.json there
    assert bad.exit_code == 2 and "results.json" in bad.stderr, output(bad)
