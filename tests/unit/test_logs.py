"""Log lines carry the node context (peer, stage, step) in text and JSON; the events log writes JSON lines."""

from __future__ import annotations

import json
import logging

import pytest

from cfnode import logs
from cfnode.logs import ContextFilter, EventLog, _JsonFormatter, log_context, set_log_context, text_formatter

PEER = "12D3KooWabcdEFGHijklMNOPqrstUVWXyz0123456789abcdef"


def warn() -> str:
    return logging.getLevelName(logging.WARNING)  # hivemind renames it to WARN once imported


@pytest.fixture(autouse=True)
def _clean_context():
    saved = dict(logs._context)
    set_log_context(peer=None, stage=None, step=None)
    yield
    logs._context.update(saved)


def _format(formatter: logging.Formatter, msg: str = "hello %s", *args: object) -> str:
    record = logging.LogRecord("cfnode.node", logging.WARNING, __file__, 1, msg, args or ("world",), None)
    assert ContextFilter().filter(record)
    return formatter.format(record)


def test_text_line_without_context_has_no_brackets() -> None:
    line = _format(text_formatter())
    assert line.endswith(f" {warn()} cfnode.node: hello world"), line


def test_text_line_carries_peer_stage_and_step() -> None:
    set_log_context(peer=PEER, stage=2, step=41)
    line = _format(text_formatter())
    assert line.endswith(f" {warn()} cfnode.node [peer 12D3KooWabcd stage 2 step 41]: hello world"), line


def test_unset_fields_are_left_out() -> None:
    set_log_context(peer=PEER, stage=None, step=None)  # a spare: no stage, no step
    assert _format(text_formatter()).endswith("cfnode.node [peer 12D3KooWabcd]: hello world")
    set_log_context(stage=0)  # step 0 is shown: it is a value, not "unset"
    set_log_context(step=0)
    assert "[peer 12D3KooWabcd stage 0 step 0]" in _format(text_formatter())


def test_json_line_has_peer_stage_step_fields() -> None:
    set_log_context(peer=PEER, stage=3, step=7)
    out = json.loads(_format(_JsonFormatter()))
    assert out["peer"] == "12D3KooWabcd" and out["stage"] == 3 and out["step"] == 7
    assert out["msg"] == "hello world" and out["level"] == warn() and out["logger"] == "cfnode.node"


def test_json_line_without_context() -> None:
    out = json.loads(_format(_JsonFormatter()))
    assert not {"peer", "stage", "step"} & set(out)


def test_json_line_with_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("cfnode", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    ContextFilter().filter(record)
    out = json.loads(_JsonFormatter().format(record))
    assert "ValueError: boom" in out["exc"]


def test_context_follows_updates() -> None:
    set_log_context(peer=PEER, stage=1, step=5)
    set_log_context(step=6)
    assert log_context() == {"peer": "12D3KooWabcd", "stage": 1, "step": 6}
    with pytest.raises(TypeError):
        set_log_context(stage_idx=1)


def test_setup_logging_installs_the_filter(capsys: pytest.CaptureFixture[str]) -> None:
    root, cf = logging.getLogger(), logging.getLogger("cfnode")
    handlers, root_level, cf_level = root.handlers[:], root.level, cf.level
    try:
        logs.setup_logging("INFO", "json")
        set_log_context(peer=PEER, stage=2, step=9)
        logging.getLogger("cfnode.test").info("line %d", 1)
        out = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (out["peer"], out["stage"], out["step"], out["msg"]) == ("12D3KooWabcd", 2, 9, "line 1")
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        cf.setLevel(cf_level)


def test_event_log_writes_json_lines(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(str(path), peer="12D3KooWabcd")
    log.emit("joined", run_id="r", metrics_port=9464)
    log.emit("recovery_finished", stage=2, rule="grad-avg", duration_s=1.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["joined", "recovery_finished"]
    assert lines[0]["peer"] == "12D3KooWabcd" and lines[0]["metrics_port"] == 9464
    assert lines[1]["rule"] == "grad-avg" and lines[1]["duration_s"] == 1.5 and lines[1]["ts"] > 0
