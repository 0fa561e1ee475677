#!/usr/bin/env python
"""Validation-loss penalty of each kind of rebuild, on real swarms (`cfnode demo`), side by side.

Every run trains the same model on the same data order (seed 0) for --steps steps and validates every
--val-every steps on the same held-out batches. A reference run per recovery mode has no failure; each other
run SIGKILLs one stage (or two) once --kill-at steps have committed, and a spare rebuilds it:

    middle    checkfree,  stage 2 of 4      (CheckFree: gradient-norm weighted average of stages 1 and 3)
    adjacent  checkfree,  stages 2 and 3    (distance + norm weighted average of stages 1 and 4)
    edge      checkfree+, stage 1 of 4      (copy of its swap partner, stage 2)
    stage0    checkfree+, stage 0           (embedding/norm/head from the replica on stage 1 or 4)

The penalty is the run's validation loss minus its mode's reference at the same step (same data seen), at
each validation point after the kill. Runs are deterministic up to float non-associativity, so the reference
is a fair counterfactual.

    python bench/penalty.py --steps 60 --kill-at 30 --json bench/results-penalty-small.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

from cfnode.localswarm import read_events

SCENARIOS: dict[str, tuple[str, list[int]]] = {
    "reference": ("checkfree", []),
    "middle": ("checkfree", [2]),
    "adjacent": ("checkfree", [2, 3]),
    "reference+": ("checkfree+", []),
    "edge": ("checkfree+", [1]),
    "stage0": ("checkfree+", [0]),
}


def run(name: str, recovery: str, kills: list[int], args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    rundir = os.path.join(workdir, name)
    os.makedirs(rundir, exist_ok=True)
    summary_path = os.path.join(rundir, "summary.json")
    cmd = [sys.executable, "-m", "cfnode", "demo", "--preset", args.preset, "--stages", "4",
           "--steps", str(args.steps), "--val-every", str(args.val_every), "--recovery", recovery,
           "--spares", str(max(1, len(kills))), "--workdir", rundir, "--json-summary", summary_path,
           "--heartbeat-period", "1", "--heartbeat-ttl", "4"]
    for stage in kills:
        cmd += ["--kill", f"{stage}@{args.kill_at}"]
    started = time.monotonic()
    print(f"running {name}: {' '.join(cmd[3:])}", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: demo exited with {done.returncode}: {done.stderr[-1500:]}")
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    val: dict[int, float] = {}
    for path in os.listdir(rundir):
        if path.endswith(".events.jsonl"):
            for e in read_events(os.path.join(rundir, path)):
                if e["event"] == "step" and e.get("val_loss") is not None:
                    val[e["step"]] = e["val_loss"]
    return {"name": name, "recovery": recovery, "kills": kills, "val_loss": dict(sorted(val.items())),
            "recoveries": summary["recoveries"], "wall_s": round(time.monotonic() - started, 1)}


def penalties(result: dict[str, Any], reference: dict[str, Any], kill_at: int) -> dict[int, float]:
    """Validation loss minus the reference's at each validation step after the kill."""
    ref = reference["val_loss"]
    return {step: round(v - ref[step], 4) for step, v in result["val_loss"].items() if step > kill_at and step in ref}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kill-at", type=int, default=30)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if unknown := set(names) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="cfnode-penalty-")
    results = {name: run(name, *SCENARIOS[name], args, workdir) for name in names}

    print(f"\nvalidation loss after a kill at step {args.kill_at} (preset {args.preset}, L=4), minus the same "
          "mode's run without failure at the same step")
    print(f"{'scenario':<10} {'mode':<11} {'rebuild':<13} {'rebuild s':>9}  penalty by step")
    table = []
    for name, res in results.items():
        if not res["kills"]:
            continue
        ref_name = "reference" if res["recovery"] == "checkfree" else "reference+"
        if ref_name not in results:
            continue
        pen = penalties(res, results[ref_name], args.kill_at)
        hows = ",".join(sorted({str(r.get("how")) for r in res["recoveries"]}))
        rebuild = max((r.get("rebuild_s") or 0.0) for r in res["recoveries"]) if res["recoveries"] else None
        table.append({"scenario": name, "mode": res["recovery"], "how": hows, "rebuild_s": rebuild,
                      "penalty": pen})
        cells = "  ".join(f"@{s}: {p:+.4f}" for s, p in pen.items())
        print(f"{name:<10} {res['recovery']:<11} {hows:<13} {rebuild if rebuild is not None else '-':>9}  {cells}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                       "args": vars(args), "runs": results, "penalties": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
