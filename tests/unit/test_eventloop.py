"""The node process's event loop (cfnode/eventloop.py, `--event-loop`)."""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest
import uvloop

from cfnode.config import NetworkConfig
from cfnode.errors import ConfigError
from cfnode.eventloop import loop_factory, run_loop


async def _running_loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_run_loop_runs_the_coroutine_on_the_chosen_loop() -> None:
    assert run_loop(_running_loop_type(), "uvloop") is uvloop.Loop
    assert run_loop(_running_loop_type(), "asyncio") is not uvloop.Loop
    assert issubclass(run_loop(_running_loop_type(), "asyncio"), asyncio.BaseEventLoop)


def test_without_uvloop_the_node_runs_on_asyncio_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("no uvloop here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    with caplog.at_level("WARNING", logger="cfnode.eventloop"):
        assert loop_factory("uvloop") is asyncio.new_event_loop
    assert "uvloop is not installed" in caplog.text


def test_an_unknown_event_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="event_loop"):
        NetworkConfig(event_loop="trio")
