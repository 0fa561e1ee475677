"""`cfnode demo` end to end: real processes, a JSON summary, an exit code, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from cfnode.localswarm import read_events
from tests.support.swarm import wait_until

pytestmark = pytest.mark.loopback
TINY = ["--preset", "tiny", "--stages", "2", "--heartbeat-period", "0.5", "--heartbeat-ttl", "3",
        "--microbatch-size", "4", "--val-every", "5"]
TINY_FLAGS = TINY[4:]  # TINY without --preset tiny --stages 2: the group tests name their own
REBUILDS = ("recovery_started", "recovery_finished")


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


def _run_demo(tmp_path, *args: str, timeout_s: float) -> dict:
    """Run `cfnode demo` to the end (stderr to a file: the demo never blocks on a full pipe); its summary, after
    checking that it exited 0 and left no process behind."""
    workdir, summary_path = str(tmp_path / "demo"), str(tmp_path / "summary.json")
    with open(tmp_path / "demo.stderr", "wb") as stderr:
        code = subprocess.run([sys.executable, "-m", "cfnode", "demo", *TINY_FLAGS, *args, "--workdir", workdir,
                               "--json-summary", summary_path], stdout=subprocess.DEVNULL, stderr=stderr,
                              stdin=subprocess.DEVNULL, timeout=timeout_s).returncode
    assert code == 0, (tmp_path / "demo.stderr").read_text(errors="replace")[-3000:]
    assert not _procs_of(workdir), "the demo must stop every process it started"
    return json.load(open(summary_path, encoding="utf-8"))


@pytest.mark.parametrize("args", [("--kill-group", "1@x"), ("--kill-group", "3@5"), ("--replicas", "0"),
                                  ("--kill-group", "1@5", "--spares", "0")])
def test_demo_group_flags_are_checked_before_anything_starts(args: tuple[str, ...]) -> None:
    out = subprocess.run([sys.executable, "-m", "cfnode", "demo", "--preset", "tiny", "--stages", "2", *args],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and args[0] in errors[0], out.stderr  # one line naming the flag
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow  # ~50-150 s on 2 cores: 7 processes
@pytest.mark.timeout(400)
def test_demo_kill_of_one_group_member_is_a_member_loss_without_a_rebuild(tmp_path) -> None:
    summary = _run_demo(tmp_path, "--preset", "tiny", "--stages", "2", "--replicas", "2", "--steps", "20",
                           "--kill", "1@6", timeout_s=360)
    assert summary["steps_completed"] == 20
    assert summary["replicas"] == 2
    [rec] = summary["recoveries"]
    assert (rec["stage"], rec["loss"], rec["rebuilt"], rec["how"], rec["kind"]) == (
        1, "member", False, "routed-around", "member-loss"), rec
    assert rec["members_before"] == 2 and rec["members_killed"] == 1 and rec["killed_at_step"] >= 6, rec
    assert rec["serving_s"] is not None and rec["serving_s"] >= 0, rec
    assert rec["rule"] is None and rec["rebuild_s"] is None, rec
    assert not [e for e in summary["events"] if e["event"] in REBUILDS], "a member loss is not a rebuild"
    # the extra members joined their groups by exact copy, reported as such
    joins = summary["joins"]
    assert {j["stage"] for j in joins} >= {1, 2}, joins
    assert all((j["how"], j["kind"]) == ("joined", "exact-copy") for j in joins), joins


@pytest.mark.slow  # ~1.5-3 min on 2 cores: 7 processes
@pytest.mark.timeout(400)
def test_demo_kill_of_stage_0s_lead_hands_the_driving_to_its_follower(tmp_path) -> None:
    summary = _run_demo(tmp_path, "--preset", "tiny", "--stages", "2", "--replicas", "2", "--steps", "40",
                           "--kill", "0@6", timeout_s=360)
    assert summary["steps_completed"] == 40  # plain checkfree: no exit 5, the follower drove on and exported
    [rec] = summary["recoveries"]
    assert (rec["stage"], rec["loss"], rec["rebuilt"], rec["how"]) == (0, "member", False, "takeover"), rec
    assert rec["members_before"] == 2 and rec["serving_s"] is not None, rec
    assert not [e for e in summary["events"] if e["event"] in REBUILDS or e["event"] == "unrecoverable"]
    assert len([e for e in summary["events"] if e["event"] == "stage0_takeover"]) == 1
    assert summary["export_dir"], "the new lead exported the model at --max-steps"


@pytest.mark.slow  # ~2-3 min on 2 cores: 9 processes
@pytest.mark.timeout(600)
def test_demo_kill_group_rebuilds_the_stage_with_checkfree(tmp_path) -> None:
    # 3 stages: stage 2 has transformer neighbours on both sides, so CheckFree averages them (grad-avg); a
    # rebuilt stage 1 would be a copy of stage 2 (stage 0 is no donor)
    summary = _run_demo(tmp_path, "--preset", "tiny", "--stages", "3", "--replicas", "2", "--steps", "40",
                           "--kill-group", "2@5", timeout_s=540)
    assert summary["steps_completed"] == 40
    [rec] = summary["recoveries"]
    assert (rec["stage"], rec["loss"], rec["rebuilt"], rec["how"], rec["rule"]) == (
        2, "stage", True, "grad-avg", "grad-avg"), rec
    assert rec["members_before"] == 2 and sorted(rec["nodes"]) == ["stage2", "stage2m1"], rec
    assert rec["rebuilt_by"] == "spare0" and rec["generation"] == 2 and rec["serving_s"] is not None, rec
    assert all(j["how"] == "joined" for j in rec["joins"]), rec
