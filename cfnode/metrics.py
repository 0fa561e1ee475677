"""Prometheus metrics of one node: its own CollectorRegistry (several nodes may share a test process) and an
optional HTTP exporter. Names follow reference/ecosystem.md §2.3: `cfnode_` prefix, base-unit suffixes,
counters end in `_total`, labelled series are created at start-up so they exist before the first event."""

from __future__ import annotations

import platform
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)

from cfnode import __version__
from cfnode.errors import REJECT_REASONS
from cfnode.net.validation import REJECT_REASONS as DHT_REJECT_REASONS

RPC_METHODS = ("forward", "backward", "get_weights", "info", "commit", "abort", "replica", "restore", "admit")
RPC_SIDES = ("client", "server")
RPC_RESULTS = ("ok", "rejected")  # incoming RPCs answered; an exception escaping a handler is not counted
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATES = ("joining", "online", "recovering", "standby", "fenced", "offline")
ABORT_REASONS = ("peer_unavailable", "rejected", "timeout", "stage_missing", "reported", "error", "nonfinite_grad",
                 "cancelled", "group_diverged")
LOOPS = ("heartbeat", "membership", "driver", "claim", "dht_read")
DROP_REASONS = ("generation",)
TRANSFER_DIRECTIONS = ("sent", "received")
TRANSFER_KINDS = ("activations", "gradients", "weights", "replica")
BAN_REASONS = ("rpc_failure", "confirmed_dead", "rejections")  # rejections: banned as a sender (net/guard.py)
NEIGHBORS = ("prev", "next")
RECOVERY_ROLES = ("recovered",)
RECOVERY_RULES = ("grad-avg", "uniform-avg", "copy", "random")
RECOVERY_RESULTS = ("success", "rejected_input", "unrecoverable")
NODE_ROLES = ("stage", "bootstrap")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_info(registry: CollectorRegistry) -> None:
    """`cfnode_build_info{version, hivemind_version, torch_version, python_version} 1` (from package metadata,
    so the bootstrap does not import torch for it)."""
    Info("cfnode_build", "Versions of cfnode and its main dependencies (value 1)", registry=registry).info(
        {"version": __version__, "hivemind_version": _version("hivemind"), "torch_version": _version("torch"),
         "python_version": platform.python_version()}
    )


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Start an HTTP exporter of `registry`; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


class BootstrapMetrics:
    """The bootstrap's small registry: build info, node info (role="bootstrap"), DHT peers, process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        build_info(r)
        ProcessCollector(registry=r)
        self.node_info = Gauge("cfnode_node_info", "This process (value 1): its peer id, role and run",
                               ["peer_id", "role", "run_id"], registry=r)
        self.dht_peers = Gauge("cfnode_dht_peers", "Peers in this node's DHT routing table", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port (useful with port 0)."""
        return serve(self.registry, host, port)


class NodeMetrics(BootstrapMetrics):
    """A stage node's registry: the bootstrap's series plus everything about its stage, training and RPCs."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.stage_index = Gauge("cfnode_stage_index", "Stage held by this node (-1: none)", registry=r)
        self.stage_generation = Gauge("cfnode_stage_generation", "Generation of the stage held", registry=r)
        self.stage_state = Gauge("cfnode_stage_state", "1 for the node's current state", ["state"], registry=r)
        self.model_parameters = Gauge("cfnode_model_parameters", "Parameters held by this stage", registry=r)
        self.training_step = Gauge("cfnode_training_step", "Last committed step", registry=r)
        self.steps_committed = Counter("cfnode_steps_committed", "Committed steps", registry=r)
        self.steps_aborted = Counter("cfnode_steps_aborted", "Aborted step attempts", ["reason"], registry=r)
        self.microbatches_issued = Counter("cfnode_microbatches_issued", "Microbatches issued (stage 0)",
                                           registry=r)
        self.microbatches_committed = Counter("cfnode_microbatches_committed",
                                              "Microbatches whose step committed (stage 0)", registry=r)
        self.microbatches_processed = Counter("cfnode_microbatches_processed", "Microbatch passes computed",
                                              ["direction"], registry=r)
        self.microbatches_dropped = Counter("cfnode_microbatches_dropped", "Microbatches dropped",
                                            ["reason"], registry=r)
        self.microbatches_rerouted = Counter("cfnode_microbatches_rerouted",
                                             "Microbatches sent again within their attempt, around a stage group's "
                                             "lost member (stage 0)", registry=r)
        self.tokens_processed = Counter("cfnode_tokens_processed", "Training tokens committed (stage 0)",
                                        registry=r)
        self.loss = Gauge("cfnode_loss", "Mean training loss of the last step (stage 0)", registry=r)
        self.validation_loss = Gauge("cfnode_validation_loss", "Last validation loss (stage 0)", registry=r)
        self.learning_rate = Gauge("cfnode_learning_rate", "Learning rate of this stage", registry=r)
        self.grad_norm = Gauge("cfnode_grad_norm", "Post-clip gradient norm of the last step", registry=r)
        self.grad_norm_raw = Gauge("cfnode_grad_norm_raw", "Pre-clip gradient norm of the last step", registry=r)
        self.step_duration = Histogram("cfnode_step_duration_seconds",
                                       "Wall time of a committed step (stage 0)", registry=r,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.rpc_requests = Counter("cfnode_rpc_requests", "Incoming RPCs answered, by result",
                                    ["method", "result"], registry=r)
        self.rpc_duration = Histogram("cfnode_rpc_duration_seconds",
                                      "Latency of successful RPCs, as client and as server", ["method", "side"],
                                      registry=r, buckets=RPC_BUCKETS)
        self.rpc_rejected = Counter("cfnode_rpc_rejected", "Incoming RPCs rejected by validation",
                                    ["method", "reason"], registry=r)
        self.rpc_retries = Counter("cfnode_rpc_retries", "Outgoing RPCs retried after a failure", ["method"],
                                   registry=r)
        self.rpc_failures = Counter("cfnode_rpc_failures", "Outgoing RPCs that failed", ["method"], registry=r)
        self.transfer_bytes = Counter("cfnode_transfer_bytes", "Tensor payload bytes sent and received",
                                      ["direction", "kind"], registry=r)
        self.peer_bans = Counter("cfnode_peer_bans", "Peers banned: not routed to after a failed call, or refused "
                                 "as a sender after repeated rejections (reason=rejections)", ["reason"], registry=r)
        self.swarm_stages_online = Gauge("cfnode_swarm_stages_online", "Stages with an ONLINE owner", registry=r)
        self.swarm_standby = Gauge("cfnode_swarm_standby_nodes", "Spares seen in the DHT", registry=r)
        self.last_announce = Gauge("cfnode_last_announce_timestamp_seconds", "Unix time of the last heartbeat",
                                   registry=r)
        self.stage_failures_detected = Counter("cfnode_stage_failures_detected",
                                               "Neighbour stages seen losing their live owner (once per incident)",
                                               ["neighbor"], registry=r)
        self.recoveries = Counter("cfnode_recoveries", "Stage rebuilds by this node, by rule and result",
                                  ["role", "rule", "result"], registry=r)
        self.recovery_duration = Histogram("cfnode_recovery_duration_seconds",
                                           "Wall time of a successful rebuild: fetch, average, install",
                                           registry=r, buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.last_recovery = Gauge("cfnode_last_recovery_timestamp_seconds", "Unix time of the last rebuild",
                                   registry=r)
        self.replica_step = Gauge("cfnode_replica_step", "Step of the copy of another stage held (-1: none)",
                                  registry=r)
        self.hops_received = Counter("cfnode_hops_received", "Training hops accepted, by the stage they came from "
                                     "(shows the CheckFree+ swapped routes)", ["direction", "from_stage"],
                                     registry=r)
        self.unrecoverable = Gauge("cfnode_swarm_unrecoverable", "1 while the swarm lost state it cannot rebuild",
                                   registry=r)
        self.loop_errors = Counter("cfnode_loop_errors", "Errors a long-lived loop survived (logged, backed off)",
                                   ["loop"], registry=r)
        self.dht_records_dropped = Counter("cfnode_dht_records_dropped",
                                           "DHT records this node's reader ignored, by reason", ["reason"],
                                           registry=r)
        self.dht_records_rejected = Counter(
            "cfnode_dht_records_rejected", "Records of this run the DHT refused to store or ignored in a read "
            "(net/validation.py: unsigned, not owner-bound, forged, unparseable, old version, expiry out of bounds), "
            "by reason; mirrors the DHT process's counts", ["reason"], registry=r)
        self._dht_rejections_seen: dict[str, int] = {}
        self.averaging_duration = Histogram("cfnode_group_averaging_duration_seconds",
                                            "Wall time of a stage group's gradient all-reduce in one commit",
                                            registry=r, buckets=RPC_BUCKETS)
        self.group_members = Gauge("cfnode_group_members", "ONLINE members of each stage's group, as this node "
                                   "sees them", ["stage"], registry=r)
        self.group_joins = Counter("cfnode_group_joins", "Exact joins of a live stage group: as the newcomer "
                                   "(joined) or stage 0 (admitted), or that timed out", ["role"], registry=r)
        self.commit_retries = Counter("cfnode_commit_retries", "Commit RPCs sent again until the stage confirmed "
                                      "(stage 0)", registry=r)
        # Every labelled series exists from the start (at 0), so rate() and alerts see it before its first event.
        for state in STATES:
            self.stage_state.labels(state=state)
        for method in RPC_METHODS:
            self.rpc_failures.labels(method=method)
            self.rpc_retries.labels(method=method)
            for result in RPC_RESULTS:
                self.rpc_requests.labels(method=method, result=result)
            for reason in REJECT_REASONS:
                self.rpc_rejected.labels(method=method, reason=reason)
            for side in RPC_SIDES:
                self.rpc_duration.labels(method=method, side=side)
        for reason in ABORT_REASONS:
            self.steps_aborted.labels(reason=reason)
            self.microbatches_dropped.labels(reason=reason)
        for direction in ("forward", "backward"):
            self.microbatches_processed.labels(direction=direction)
        for direction in TRANSFER_DIRECTIONS:
            for kind in TRANSFER_KINDS:
                self.transfer_bytes.labels(direction=direction, kind=kind)
        for reason in BAN_REASONS:
            self.peer_bans.labels(reason=reason)
        for neighbor in NEIGHBORS:
            self.stage_failures_detected.labels(neighbor=neighbor)
        for role in RECOVERY_ROLES:
            for rule in RECOVERY_RULES:
                for result in RECOVERY_RESULTS:
                    self.recoveries.labels(role=role, rule=rule, result=result)
        for loop in LOOPS:
            self.loop_errors.labels(loop=loop)
        for reason in DROP_REASONS:
            self.dht_records_dropped.labels(reason=reason)
        for reason in DHT_REJECT_REASONS:
            self.dht_records_rejected.labels(reason=reason)
        for role in ("joined", "admitted", "timed_out"):
            self.group_joins.labels(role=role)
        self.stage_index.set(-1)
        self.replica_step.set(-1)

    def mirror_dht_rejections(self, counts: dict[str, int]) -> None:
        """Bring `cfnode_dht_records_rejected_total` up to the DHT process's running totals
        (`SwarmDHT.rejected_records()`): the counter grows by what each reason gained since the last call."""
        for reason, total in counts.items():
            gained = int(total) - self._dht_rejections_seen.get(reason, 0)
            if gained > 0:
                self.dht_records_rejected.labels(reason=reason).inc(gained)
                self._dht_rejections_seen[reason] = int(total)

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.stage_state.labels(state=s).set(1 if s == state else 0)
