"""Stage 0's way around a stage group's member lost mid-step (docs/groups.md "Losing members"): the member a
failed hop (or the view) points at is pinged; if it is dead and its group has another participant, it leaves the
attempt and every microbatch whose path went through it is sent again, one incarnation more (`inc`), through a
sibling; otherwise the attempt fails as before. A member that already accumulated such a microbatch only passes
its gradient on (train/worker.py), so no stage counts a microbatch twice.

One job: which incarnation of each microbatch is current and when to reroute instead of abort. It sees the
driver through `RerouteHost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from cfnode.train.schedule import AttemptKey

if TYPE_CHECKING:
    from cfnode.train.driver import DriverHost
    from cfnode.train.paths import AttemptPaths
    from cfnode.train.suspects import Suspects

logger = logging.getLogger(__name__)


class RerouteHost(Protocol):
    """The driver, as the reroutes see it."""

    host: DriverHost
    paths: AttemptPaths
    suspects: Suspects
    attempt: AttemptKey | None

    @property
    def failed(self) -> bool: ...
    def fail(self, reason: str, detail: str) -> None: ...
    def reopen(self, mb: int) -> None: ...
    async def resend(self, key: AttemptKey, mb: int, inc: int) -> None: ...


class Reroutes:
    def __init__(self, driver: RerouteHost) -> None:
        self.driver = driver
        self.incarnation: dict[int, int] = {}
        """Training microbatch -> its incarnation in the current attempt (0 unless sent again)."""
        self.committing = False
        """The attempt's microbatches are all back and its commit started: a member lost now aborts it."""
        self._gone: set[str] = set()
        self._confirming: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """A new attempt: every microbatch at incarnation 0, nobody lost yet."""
        self.incarnation, self.committing = {}, False
        self._gone.clear()
        self._confirming.clear()

    def stop(self) -> None:
        """The attempt is over: pings and resends still running are cancelled."""
        for task in list(self._tasks):
            task.cancel()

    def of(self, mb: int) -> int:
        return self.incarnation.get(mb, 0)

    def current(self, meta: dict[str, Any]) -> bool:
        """A training hop of the incarnation of its microbatch we wait for."""
        return meta.get("inc", 0) == self.of(meta["mb"])

    def handle(self, key: AttemptKey, suspect: str, reason: str, detail: str) -> bool:
        """A failed hop points at `suspect`; True if the attempt goes on (it is pinged, and routed around if it is
        dead and its group has another participant), False if the attempt must fail now."""
        if self.committing:
            return False
        if suspect in self._gone:
            return True  # a hop of an incarnation already sent again around it
        if not self.driver.paths.can_drop(suspect):
            return False
        if suspect not in self._confirming:
            self._confirming.add(suspect)
            self._track(self._confirm_then_reroute(key, suspect, reason, detail))
        return True

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_then_reroute(self, key: AttemptKey, peer: str, reason: str, detail: str) -> None:
        driver = self.driver
        try:
            dead = await driver.host.confirm_suspect(peer)  # a ping; bans it if silent
        finally:
            self._confirming.discard(peer)
        if key != driver.attempt or driver.failed:
            return
        if not dead or not driver.paths.can_drop(peer) or self.committing:
            driver.suspects.add(peer)
            driver.fail(reason, detail)
            return
        self._reroute(key, peer)

    def _reroute(self, key: AttemptKey, peer: str) -> None:
        driver, host = self.driver, self.driver.host
        stage = driver.paths.stage_of(peer)
        assert stage is not None
        moved = driver.paths.drop(peer)
        self._gone.add(peer)
        driver.suspects.note_dead(peer, stage)
        for mb in moved:
            self.incarnation[mb] = self.of(mb) + 1
            driver.reopen(mb)
            self._track(driver.resend(key, mb, self.incarnation[mb]))
        host.metrics.microbatches_rerouted.inc(len(moved))
        logger.warning("step %d: stage %d's member %s is lost mid-step; %d microbatch(es) go through %s instead",
                       key.step, stage, peer[:12], len(moved), ", ".join(p[:12] for p in driver.paths.group(stage)))
        host.events.emit("hop_rerouted", step=key.step, attempt=key.attempt, stage=stage, peer=peer[:12],
                         microbatches=moved)
