"""Prometheus metrics of one node: its own CollectorRegistry (several nodes may share a test process) and an
optional HTTP exporter. Names follow reference/ecosystem.md §2.3: `cfnode_` prefix, base-unit suffixes,
counters end in `_total`, labelled series are created at start-up so they exist before the first event."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from cfnode import __version__
from cfnode.errors import REJECT_REASONS

RPC_METHODS = ("forward", "backward", "get_weights", "info", "commit", "abort")
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATES = ("joining", "online", "recovering", "standby", "fenced", "offline")
ABORT_REASONS = ("peer_unavailable", "rejected", "timeout", "stage_missing", "reported", "error")


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        Info("cfnode_build", "cfnode build", registry=r).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        self.node_info = Gauge("cfnode_node_info", "This node (value 1)", ["peer_id", "role", "run_id"], registry=r)
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
        self.tokens_processed = Counter("cfnode_tokens_processed", "Training tokens committed (stage 0)",
                                        registry=r)
        self.loss = Gauge("cfnode_loss", "Mean training loss of the last step (stage 0)", registry=r)
        self.validation_loss = Gauge("cfnode_validation_loss", "Last validation loss (stage 0)", registry=r)
        self.learning_rate = Gauge("cfnode_learning_rate", "Learning rate of this stage", registry=r)
        self.grad_norm = Gauge("cfnode_grad_norm", "Post-clip gradient norm of the last step", registry=r)
        self.grad_norm_raw = Gauge("cfnode_grad_norm_raw", "Pre-clip gradient norm of the last step", registry=r)
        self.step_duration = Histogram("cfnode_step_duration_seconds", "Wall time of a committed step",
                                       registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.rpc_requests = Counter("cfnode_rpc_requests", "RPCs served", ["method", "result"], registry=r)
        self.rpc_duration = Histogram("cfnode_rpc_duration_seconds", "RPC latency", ["method", "side"],
                                      registry=r, buckets=RPC_BUCKETS)
        self.rpc_rejected = Counter("cfnode_rpc_rejected", "Rejected incoming RPCs", ["method", "reason"],
                                    registry=r)
        self.rpc_retries = Counter("cfnode_rpc_retries", "Outgoing RPCs retried after a failure", ["method"],
                                   registry=r)
        self.rpc_failures = Counter("cfnode_rpc_failures", "Outgoing RPCs that failed", ["method"], registry=r)
        self.transfer_bytes = Counter("cfnode_transfer_bytes", "Tensor bytes moved", ["direction", "kind"],
                                      registry=r)
        self.peer_bans = Counter("cfnode_peer_bans", "Peers banned after a failed call", ["reason"], registry=r)
        self.swarm_stages_online = Gauge("cfnode_swarm_stages_online", "Stages with an ONLINE owner", registry=r)
        self.swarm_standby = Gauge("cfnode_swarm_standby_nodes", "Spares seen in the DHT", registry=r)
        self.last_announce = Gauge("cfnode_last_announce_timestamp_seconds", "Time of the last heartbeat",
                                   registry=r)
        self.stage_failures_detected = Counter("cfnode_stage_failures_detected", "Neighbour losses detected",
                                               ["neighbor"], registry=r)
        self.recoveries = Counter("cfnode_recoveries", "Stage rebuilds", ["role", "rule", "result"], registry=r)
        self.recovery_duration = Histogram("cfnode_recovery_duration_seconds", "Claim-to-ONLINE time of a rebuild",
                                           registry=r, buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.last_recovery = Gauge("cfnode_last_recovery_timestamp_seconds", "Time of the last rebuild",
                                   registry=r)
        self.unrecoverable = Gauge("cfnode_swarm_unrecoverable", "1 while the swarm lost state it cannot rebuild",
                                   registry=r)
        for state in STATES:
            self.stage_state.labels(state=state)
        for method in RPC_METHODS:
            self.rpc_failures.labels(method=method)
            self.rpc_retries.labels(method=method)
            for result in ("ok", "rejected", "error"):
                self.rpc_requests.labels(method=method, result=result)
            for reason in REJECT_REASONS:
                self.rpc_rejected.labels(method=method, reason=reason)
        for reason in ABORT_REASONS:
            self.steps_aborted.labels(reason=reason)
            self.microbatches_dropped.labels(reason=reason)
        for direction in ("forward", "backward"):
            self.microbatches_processed.labels(direction=direction)
        for neighbor in ("prev", "next"):
            self.stage_failures_detected.labels(neighbor=neighbor)
        self.stage_index.set(-1)

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.stage_state.labels(state=s).set(1 if s == state else 0)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
