"""The metrics contract (cfnode.metrics): exact family names, types and label names, so a rename or a new label
breaks this test (and must update docs/operations.md); labelled series exist from start-up; naming rules."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from cfnode.errors import REJECT_REASONS
from cfnode.metrics import (
    ABORT_REASONS,
    RECOVERY_RESULTS,
    RECOVERY_RULES,
    RPC_METHODS,
    STATES,
    BootstrapMetrics,
    NodeMetrics,
)

# exposed family name -> (type, label names)
NODE_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cfnode_build_info": ("gauge", ("hivemind_version", "python_version", "torch_version", "version")),
    "cfnode_node_info": ("gauge", ("peer_id", "role", "run_id")),
    "cfnode_dht_peers": ("gauge", ()),
    "cfnode_stage_index": ("gauge", ()),
    "cfnode_stage_generation": ("gauge", ()),
    "cfnode_stage_state": ("gauge", ("state",)),
    "cfnode_model_parameters": ("gauge", ()),
    "cfnode_training_step": ("gauge", ()),
    "cfnode_steps_committed_total": ("counter", ()),
    "cfnode_steps_aborted_total": ("counter", ("reason",)),
    "cfnode_microbatches_issued_total": ("counter", ()),
    "cfnode_microbatches_committed_total": ("counter", ()),
    "cfnode_microbatches_processed_total": ("counter", ("direction",)),
    "cfnode_microbatches_dropped_total": ("counter", ("reason",)),
    "cfnode_microbatches_rerouted_total": ("counter", ()),
    "cfnode_tokens_processed_total": ("counter", ()),
    "cfnode_loss": ("gauge", ()),
    "cfnode_validation_loss": ("gauge", ()),
    "cfnode_learning_rate": ("gauge", ()),
    "cfnode_grad_norm": ("gauge", ()),
    "cfnode_grad_norm_raw": ("gauge", ()),
    "cfnode_step_duration_seconds": ("histogram", ()),
    "cfnode_rpc_requests_total": ("counter", ("method", "result")),
    "cfnode_rpc_duration_seconds": ("histogram", ("method", "side")),
    "cfnode_rpc_rejected_total": ("counter", ("method", "reason")),
    "cfnode_rpc_retries_total": ("counter", ("method",)),
    "cfnode_rpc_failures_total": ("counter", ("method",)),
    "cfnode_transfer_bytes_total": ("counter", ("direction", "kind")),
    "cfnode_peer_bans_total": ("counter", ("reason",)),
    "cfnode_swarm_stages_online": ("gauge", ()),
    "cfnode_swarm_standby_nodes": ("gauge", ()),
    "cfnode_last_announce_timestamp_seconds": ("gauge", ()),
    "cfnode_stage_failures_detected_total": ("counter", ("neighbor",)),
    "cfnode_recoveries_total": ("counter", ("result", "role", "rule")),
    "cfnode_recovery_duration_seconds": ("histogram", ()),
    "cfnode_last_recovery_timestamp_seconds": ("gauge", ()),
    "cfnode_replica_step": ("gauge", ()),
    "cfnode_hops_received_total": ("counter", ("direction", "from_stage")),
    "cfnode_swarm_unrecoverable": ("gauge", ()),
    "cfnode_loop_errors_total": ("counter", ("loop",)),
    "cfnode_dht_records_dropped_total": ("counter", ("reason",)),
    "cfnode_dht_records_rejected_total": ("counter", ("reason",)),
    "cfnode_commit_retries_total": ("counter", ()),
    "cfnode_group_averaging_duration_seconds": ("histogram", ()),
    "cfnode_group_members": ("gauge", ("stage",)),
    "cfnode_group_joins_total": ("counter", ("role",)),
}
BOOTSTRAP_FAMILIES = {k: NODE_FAMILIES[k] for k in ("cfnode_build_info", "cfnode_node_info", "cfnode_dht_peers")}
PROCESS_FAMILIES = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                    "process_open_fds"}


def _exposed(registry) -> dict[str, str]:
    """`# TYPE` lines of the text exposition: name -> type, without prometheus_client's `_created` twins."""
    text = generate_latest(registry).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if not name.endswith("_created"):
                out[name] = kind
    return out


def _label_names(metrics: object) -> dict[str, tuple[str, ...]]:
    """Exposed name -> sorted label names of every metric object a metrics class holds."""
    out = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = value._type
            name = value._name + ("_total" if kind == "counter" else "_info" if kind == "info" else "")
            out[name] = tuple(sorted(value._labelnames))
    return out


def _series(metrics: NodeMetrics) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Sample name -> the label sets present (without histogram `le`)."""
    out: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).add(tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")))
    return out


def test_node_metric_families_types_and_labels_are_exact() -> None:
    m = NodeMetrics()
    exposed = _exposed(m.registry)
    cf = {name: kind for name, kind in exposed.items() if name.startswith("cfnode_")}
    assert cf == {name: kind for name, (kind, _) in NODE_FAMILIES.items()}
    labels = _label_names(m)
    labels["cfnode_build_info"] = NODE_FAMILIES["cfnode_build_info"][1]  # an Info's labels are its values
    assert labels == {name: tuple(sorted(names)) for name, (_, names) in NODE_FAMILIES.items()}
    assert PROCESS_FAMILIES <= set(exposed), "process metrics (cpu, memory, fds) are exported too"


def test_build_info_carries_versions() -> None:
    build = _series(NodeMetrics())["cfnode_build_info"]
    (labels,) = build
    assert {k for k, _ in labels} == set(NODE_FAMILIES["cfnode_build_info"][1])
    assert all(v for _, v in labels)


def test_bootstrap_registry() -> None:
    b = BootstrapMetrics()
    exposed = _exposed(b.registry)
    assert {n: k for n, k in exposed.items() if n.startswith("cfnode_")} == {
        name: kind for name, (kind, _) in BOOTSTRAP_FAMILIES.items()}
    b.node_info.labels(peer_id="QmBoot", role="bootstrap", run_id="").set(1)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(b.registry).decode()) for s in f.samples}
    assert samples[("cfnode_node_info", (("peer_id", "QmBoot"), ("role", "bootstrap"), ("run_id", "")))] == 1


def test_naming_rules() -> None:
    for name, kind in _exposed(NodeMetrics().registry).items():
        if not name.startswith("cfnode_"):
            assert name.startswith(("process_", "python_")), name
            continue
        assert re.fullmatch(r"cfnode_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
        for unit in ("seconds", "bytes"):
            if unit in name:
                assert name.endswith((f"_{unit}", f"_{unit}_total")), name


def test_labelled_series_exist_at_start() -> None:
    s = _series(NodeMetrics())

    def values(name: str, *keys: str) -> set[tuple[str, ...]]:
        return {tuple(dict(labels)[k] for k in keys) for labels in s[name]}

    assert values("cfnode_stage_state", "state") == {(x,) for x in STATES}
    assert values("cfnode_rpc_requests_total", "method", "result") == {
        (m, r) for m in RPC_METHODS for r in ("ok", "rejected")}
    assert values("cfnode_rpc_rejected_total", "method", "reason") == {
        (m, r) for m in RPC_METHODS for r in REJECT_REASONS}
    assert values("cfnode_rpc_duration_seconds_count", "method", "side") == {
        (m, side) for m in RPC_METHODS for side in ("client", "server")}
    assert values("cfnode_rpc_failures_total", "method") == {(m,) for m in RPC_METHODS}
    assert values("cfnode_rpc_retries_total", "method") == {(m,) for m in RPC_METHODS}
    assert values("cfnode_transfer_bytes_total", "direction", "kind") == {
        (d, k) for d in ("sent", "received") for k in ("activations", "gradients", "weights", "replica")}
    assert values("cfnode_recoveries_total", "role", "rule", "result") == {
        ("recovered", rule, result) for rule in RECOVERY_RULES for result in RECOVERY_RESULTS}
    assert {"grad-avg", "uniform-avg", "copy", "random"} <= set(RECOVERY_RULES)
    assert {"success", "rejected_input", "unrecoverable"} <= set(RECOVERY_RESULTS)
    assert values("cfnode_stage_failures_detected_total", "neighbor") == {("prev",), ("next",)}
    assert values("cfnode_steps_aborted_total", "reason") == {(r,) for r in ABORT_REASONS}
    assert values("cfnode_microbatches_dropped_total", "reason") == {(r,) for r in ABORT_REASONS}
    assert values("cfnode_microbatches_processed_total", "direction") == {("forward",), ("backward",)}
    assert values("cfnode_peer_bans_total", "reason") == {("rpc_failure",), ("confirmed_dead",), ("rejections",)}
    assert "replica" in RPC_METHODS


def test_state_gauge_is_one_hot() -> None:
    m = NodeMetrics()
    m.set_state("recovering")
    s = {dict(labels)["state"]: v for (name, labels), v in _values(m).items() if name == "cfnode_stage_state"}
    assert s == {state: (1.0 if state == "recovering" else 0.0) for state in STATES}


def _values(m: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}


def test_two_nodes_in_one_process_have_separate_registries() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.steps_committed.inc()
    assert _values(a)[("cfnode_steps_committed_total", ())] == 1
    assert _values(b)[("cfnode_steps_committed_total", ())] == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
@pytest.mark.parametrize("kind", ["node", "bootstrap"])
def test_promtool_accepts_the_exposition(kind: str) -> None:
    m = NodeMetrics() if kind == "node" else BootstrapMetrics()
    m.node_info.labels(peer_id="QmX", role="stage" if kind == "node" else "bootstrap", run_id="r").set(1)
    if kind == "node":
        m.step_duration.observe(0.3)
        m.recoveries.labels(role="recovered", rule="grad-avg", result="success").inc()
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(m.registry), capture_output=True,
                         timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (out.stdout, out.stderr)
