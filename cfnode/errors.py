"""Every error cfnode raises on purpose, and the process exit codes they map to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_PEER = 3
EXIT_IDENTITY_TAKEN = 4
EXIT_UNRECOVERABLE = 5


class CfnodeError(Exception):
    """Base for every error cfnode raises on purpose."""

    exit_code = 1


class ConfigError(CfnodeError, ValueError):
    """A user-supplied setting is invalid; the message names the field."""

    exit_code = EXIT_USAGE


class ConfigMismatchError(CfnodeError):
    """This node's model config differs from the run's (the message names both hashes)."""

    exit_code = EXIT_USAGE


class NoPeerReachableError(CfnodeError):
    """None of the --peers answered."""

    exit_code = EXIT_NO_PEER


class IdentityTakenError(CfnodeError):
    """The identity file is in use by another running peer."""

    exit_code = EXIT_IDENTITY_TAKEN


class UnrecoverableError(CfnodeError):
    """The swarm lost state it cannot rebuild (e.g. stage 0 without CheckFree+)."""

    exit_code = EXIT_UNRECOVERABLE


class PeerUnavailableError(CfnodeError):
    """A neighbour did not answer in time or the connection failed; retryable."""


class RejectedError(CfnodeError):
    """The remote peer refused our message (typed reason in `.reason`)."""

    def __init__(self, reason: str, detail: str = "", *, holds: tuple[int, int] | None = None) -> None:
        super().__init__(f"rejected ({reason}): {detail}" if detail else f"rejected ({reason})")
        self.reason = reason
        self.detail = detail
        self.holds = holds


class InvalidPayload(CfnodeError):
    """An incoming message failed validation. `reason` is one of REJECT_REASONS (a metric label)."""

    def __init__(self, reason: str, detail: str, *, holds: tuple[int, int] | None = None) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.holds = holds
        """(committed steps, active attempt id) of the receiver, for `stale_step`: the sender adopts it."""


REJECT_REASONS = (
    "decode",        # garbage protobuf / msgpack / tensor bytes
    "too_large",     # byte cap exceeded while streaming
    "shape",         # wrong shape, including a same-numel reshape
    "dtype",
    "nonfinite",     # NaN or Inf
    "stale_step",    # older step/attempt than the one in progress, or unknown microbatch
    "wrong_run",
    "wrong_stage",   # message meant for another stage
    "unauthorized",  # sender is not the ONLINE owner of the expected neighbour stage
    "generation",    # sender's generation differs from its record
    "not_ready",     # this node is not serving a stage
    "route",         # a hop's route is not the one this run's mode prescribes for its microbatch
    "behind",        # a hop or commit for a step this stage has not reached: it missed a commit
    "nonfinite_grad",  # the stage's accumulated gradient has a NaN/Inf norm: the step cannot be committed
    "banned",        # the sender was banned after repeated rejections (until the ban expires)
    "rate_limited",  # too many requests of this kind from the sender
    "timeout",       # an incoming stream stalled (no part within the part timeout) or overran its deadline
    "averaging",     # a stage group's gradient all-reduce did not complete with exactly the named members
    "admission",     # a newcomer cannot be let into the stage group it asked for (full, gone, or not stage 0)
)


class RecoveryError(CfnodeError):
    """A lost stage could not be rebuilt from the donors at hand (bad or missing input); retryable."""


class AttemptAborted(CfnodeError):
    """The current step attempt was aborted (a hop failed or it timed out)."""
