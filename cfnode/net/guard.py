"""The limits of a node's RPC surface as pure logic: who is banned after repeated rejections, how many streams of
a method run at once, how often one caller may fetch weights, and the numbers, derived from the node's config.

No I/O and no asyncio: every decision is a function of the calls made and of the clock passed in (a monotonic
`() -> float`), so the servicer (net/service.py) stays small and these rules are unit-tested deterministically.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cfnode.config import NodeConfig

Clock = Callable[[], float]

STRICT_REASONS = frozenset({"decode", "too_large", "shape", "dtype", "nonfinite", "unauthorized", "route",
                            "wrong_run"})
"""Rejections that count towards a ban. An honest ring member never produces the first seven (its messages are
built by the same code from the same run config); `unauthorized` it can produce only in a bounded burst right
after an ownership change (its in-flight hops, before it notices it was fenced), which the threshold allows
for. Every other reason (`stale_step`, `not_ready`, `generation`, `wrong_stage`, `behind`, `nonfinite_grad`,
`rate_limited`, `banned`) is what honest peers send during churn (aborted attempts, rebuilds, views that lag by
a heartbeat), and `timeout` what an honest but overloaded sender or link produces: never counted (a staller
costs a slot for at most the part timeout)."""

MAX_TRACKED = 4096
"""Senders remembered per table (windows, buckets); the least recently seen is forgotten first, so a flood of
fresh peer ids costs bounded memory."""


@dataclass(frozen=True, kw_only=True)
class BanPolicy:
    threshold: int = 20
    """Strict rejections within `window_s` that ban a sender."""
    window_s: float = 60.0
    ban_s: float = 300.0


class RejectionGuard:
    """A sliding window of strict rejections per sender; `threshold` of them within `window_s` ban the sender
    for `ban_s`. A ban starts a fresh window when it expires; rejections while banned do not extend it."""

    def __init__(self, policy: BanPolicy, clock: Clock, *, max_tracked: int = MAX_TRACKED) -> None:
        if policy.threshold < 1 or policy.window_s <= 0 or policy.ban_s <= 0:
            raise ValueError(f"invalid ban policy {policy}")
        self.policy = policy
        self.clock = clock
        self.max_tracked = max_tracked
        self._windows: OrderedDict[str, deque[float]] = OrderedDict()
        self._banned: dict[str, float] = {}

    def banned_for(self, peer_id: str) -> float:
        """Seconds left of the sender's ban; 0.0 when it is not banned."""
        until = self._banned.get(peer_id)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._banned[peer_id]
            return 0.0
        return left

    def record(self, peer_id: str, reason: str) -> bool:
        """Count one rejection of `peer_id`; True when it starts a ban."""
        if reason not in STRICT_REASONS or self.banned_for(peer_id) > 0:
            return False
        now = self.clock()
        window = self._windows.pop(peer_id, None) or deque()
        self._windows[peer_id] = window  # most recently seen last
        window.append(now)
        while window and window[0] <= now - self.policy.window_s:
            window.popleft()
        if len(window) >= self.policy.threshold:
            del self._windows[peer_id]
            self._banned[peer_id] = now + self.policy.ban_s
            self._prune_bans(now)
            return True
        while len(self._windows) > self.max_tracked:
            self._windows.popitem(last=False)
        return False

    def _prune_bans(self, now: float) -> None:
        if len(self._banned) > self.max_tracked:
            self._banned = {p: t for p, t in self._banned.items() if t > now}

    def banned(self) -> dict[str, float]:
        """Every sender banned now, with the seconds left."""
        now = self.clock()
        return {p: t - now for p, t in self._banned.items() if t > now}


class SlotLimiter:
    """At most `total` concurrent holders, and at most `per_sender` of them for one sender (None: no per-sender
    bound). `try_acquire` never waits: over the limit the caller is refused."""

    def __init__(self, total: int, per_sender: int | None = None) -> None:
        if total < 1 or (per_sender is not None and per_sender < 1):
            raise ValueError(f"invalid slot limits total={total} per_sender={per_sender}")
        self.total = total
        self.per_sender = per_sender
        self.in_use = 0
        self._by_sender: dict[str, int] = {}

    def try_acquire(self, peer_id: str) -> bool:
        held = self._by_sender.get(peer_id, 0)
        if self.in_use >= self.total or (self.per_sender is not None and held >= self.per_sender):
            return False
        self.in_use += 1
        self._by_sender[peer_id] = held + 1
        return True

    def release(self, peer_id: str) -> None:
        held = self._by_sender.get(peer_id, 0)
        if held <= 0:
            raise RuntimeError(f"release without acquire for {peer_id[:12]}")
        self.in_use -= 1
        if held == 1:
            del self._by_sender[peer_id]
        else:
            self._by_sender[peer_id] = held - 1


class CallerBuckets:
    """A token bucket per caller: `capacity` calls at once, refilled at `capacity / refill_s` per second."""

    def __init__(self, capacity: int, refill_s: float, clock: Clock, *, max_tracked: int = MAX_TRACKED) -> None:
        if capacity < 1 or refill_s <= 0:
            raise ValueError(f"invalid bucket capacity={capacity} refill_s={refill_s}")
        self.capacity = capacity
        self.rate = capacity / refill_s
        self.clock = clock
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, as of)

    def tokens(self, peer_id: str) -> float:
        tokens, at = self._buckets.get(peer_id, (float(self.capacity), self.clock()))
        return min(float(self.capacity), tokens + (self.clock() - at) * self.rate)

    def take(self, peer_id: str) -> bool:
        """Spend one token of `peer_id`'s bucket; False (nothing spent) when it is empty."""
        tokens = self.tokens(peer_id)
        if tokens < 1:
            return False
        self._buckets.pop(peer_id, None)
        self._buckets[peer_id] = (tokens - 1, self.clock())
        while len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)  # forgetting a bucket only refills it early
        return True


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """The numbers of the RPC surface; `from_config` derives them (docs/protocol.md, "Limits")."""

    part_timeout_s: float = 10.0
    """The longest wait for any one part of an incoming stream, the first included."""
    hop_deadline_s: float = 40.0
    """A whole forward/backward stream: the request timeout (where the sender's own push gives up) plus one part
    timeout, so an honest slow push ends with the sender's cancel, not with a rejection here."""
    replica_deadline_s: float = 40.0
    """A whole replica stream, before its size allowance (request timeout + part timeout, as for hops)."""
    replica_rate_bytes_s: float = 10 * 2**20
    """Size allowance of a replica stream (what the sender allows itself: StageClient.push_replica)."""
    framing_slack_bytes: int = 64 * 2**10
    """Allowed on top of a tensor's exact byte size: cfnode sends uncompressed tensors whose buffers are exactly
    numel x 4 bytes; the slack covers a compressed encoding's codebook or statistics on small tensors."""
    hop_slots: int = 20
    hop_slots_per_sender: int = 10
    replica_slots: int = 2
    weights_slots: int = 2
    weights_burst: int = 4
    """get_weights calls one caller may make at once; the bucket refills `weights_burst` per `weights_refill_s`."""
    weights_refill_s: float = 8.0
    ban: BanPolicy = field(default_factory=BanPolicy)

    @classmethod
    def from_config(cls, config: NodeConfig) -> ServiceLimits:
        """Hop slots: `window` = the most microbatches stage 0 puts in the ring at once (max_in_flight, or every
        validation batch, which it sends without a window); a stage may see the window of the current attempt
        plus that of an aborted one still draining, each hop at most twice (a push retried while its first try
        is still being read): 4 x window in all, + 4; one sender at most half of that. Ban threshold: an honest
        peer's strict rejections come in bursts of at most every hop of one attempt, both directions
        (2 x num_microbatches); twice that within the window, and never fewer than 20."""
        train, net = config.train, config.network
        window = max(train.max_in_flight, train.val_batches if train.val_every else 1, 1)
        return cls(
            part_timeout_s=net.part_timeout_s,
            hop_deadline_s=net.request_timeout_s + net.part_timeout_s,
            replica_deadline_s=net.request_timeout_s + net.part_timeout_s,
            hop_slots=4 * window + 4,
            hop_slots_per_sender=2 * window + 2,
            weights_refill_s=config.heartbeat.ttl_s,
            ban=BanPolicy(threshold=max(20, 4 * train.num_microbatches)),
        )
