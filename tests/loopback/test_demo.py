"""`cfnode demo` end to end: real processes, a JSON summary, an exit code, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from cfnode.demo import read_events
from tests.support.swarm import wait_until

pytestmark = pytest.mark.loopback
TINY = ["--preset", "tiny", "--stages", "2", "--heartbeat-period", "0.5", "--heartbeat-ttl", "3",
        "--microbatch-size", "4", "--val-every", "5"]


def _procs_of(workdir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(workdir in part for part in (p.info["cmdline"] or [])) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def test_demo_trains_writes_a_summary_and_cleans_up(tmp_path) -> None:
    workdir, summary_path = str(tmp_path / "demo"), str(tmp_path / "summary.json")
    out = subprocess.run([sys.executable, "-m", "cfnode", "demo", *TINY, "--steps", "15", "--workdir", workdir,
                          "--json-summary", summary_path], capture_output=True, text=True, timeout=200,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.load(open(summary_path, encoding="utf-8"))
    assert set(summary) >= {"steps_completed", "loss_first", "loss_last", "val_loss_first", "val_loss_last",
                            "tokens_per_s", "wall_s", "events"}
    assert summary["steps_completed"] == 15
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["val_loss_last"] < summary["val_loss_first"]
    assert summary["tokens_per_s"] > 0
    kinds = {e["event"] for e in summary["events"]}
    assert {"online", "claimed", "training_finished"} <= kinds
    assert not _procs_of(workdir), "the demo must stop every process it started"


@pytest.mark.slow  # ~25-40 s; test_unrecoverable (slow) and the unit tests cover the exit path
def test_demo_exits_5_when_stage0_dies(tmp_path) -> None:
    workdir = str(tmp_path / "demo")
    stderr_path = tmp_path / "demo.stderr"
    with open(stderr_path, "wb") as stderr:  # a file, not a pipe: the demo never blocks on a full pipe buffer
        demo = subprocess.Popen([sys.executable, "-m", "cfnode", "demo", *TINY, "--steps", "100000", "--workdir",
                                 workdir], stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        events0 = os.path.join(workdir, "stage0.events.jsonl")
        wait_until(lambda: len([e for e in read_events(events0) if e["event"] == "step"]) >= 3, 180,
                   "the demo's stage 0 to train")
        stage0 = [p for p in _procs_of(workdir) if p.ppid() == demo.pid and events0 in p.info["cmdline"]]
        assert len(stage0) == 1
        os.killpg(stage0[0].pid, signal.SIGKILL)
        code = demo.wait(timeout=60)  # a hang guard, not a bound on how fast the demo gives up
        assert code == 5, stderr_path.read_text(errors="replace")[-3000:]
        assert not _procs_of(workdir)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
