"""The experiment's report: results.csv, results.json, results.md and loss_vs_time.png from per-run records.

Pure metric functions first (time to a target loss, overhead, post-recovery penalty, summary rows), then the
file writers. A run record holds the committed steps of one swarm run (`{step, time_s, loss, val_loss}`,
time since training started; `val_loss` None on steps without validation) and its events (`{kind, step,
time_s, stage, ...}`): failures (the kills; `loss` "member": one member of a stage group, which carried on
without it; "stage", or no `loss` in older records: the whole stage), recoveries (rebuilds, with
`duration_s`), joins (a newcomer became an exact copy of a live member: never a rebuild), rollbacks.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

REPORT_FORMAT = 1
DEFAULT_TARGET_MARGIN = 0.02
"""Without an explicit target, the target is the failure-free run's final validation loss plus 2 %."""
REFERENCE_STRATEGY = "checkfree"
BASELINE_STRATEGY = "none"


@dataclass(kw_only=True)
class RunRecord:
    strategy: str
    level: str | None = None
    """Failure level label (`10%/h`, `p=0.004`); None for the failure-free run, which serves every level."""
    rate: float | None = None
    p: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    planned_steps: int | None = None
    exit_code: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.exit_code != 0:
            return f"exit {self.exit_code}"
        done = self.steps[-1]["step"] if self.steps else 0
        if self.planned_steps is not None and done < self.planned_steps:
            return f"stopped at {done}"
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- pure metrics ---------------------------------------------------------------------------------------------


def val_points(run: RunRecord) -> list[tuple[float, int, float]]:
    """(time_s, step, val_loss) of every validated step, in time order (NaN/inf losses are kept)."""
    pts = [(float(s["time_s"]), int(s["step"]), float(s["val_loss"])) for s in run.steps
           if s.get("val_loss") is not None]
    return sorted(pts)


def time_to_target(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """First time a curve of (time, loss) points reaches `target`, linearly interpolated between the last point
    above it and the first at or below it; None if it never does. Points must be in time order."""
    prev: tuple[float, float] | None = None
    for t, v in points:
        if math.isfinite(v) and v <= target:
            if prev is None or not math.isfinite(prev[1]):
                return t
            t0, v0 = prev
            return t0 + (v0 - target) / (v0 - v) * (t - t0)
        prev = (t, v)
    return None


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (x, y) points sorted by x; None outside their range."""
    if not points or x < points[0][0] or x > points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def wall_clock_s(run: RunRecord) -> float | None:
    """Seconds from the start of training to the last committed step."""
    return float(run.steps[-1]["time_s"]) if run.steps else None


def steps_per_s(run: RunRecord) -> float | None:
    wall = wall_clock_s(run)
    if not wall or wall <= 0:
        return None
    return run.steps[-1]["step"] / wall


def overhead_pct(rate: float | None, baseline_rate: float | None) -> float | None:
    """Extra wall-clock per step relative to the baseline, in percent: (baseline steps/s / steps/s - 1) * 100."""
    if not rate or not baseline_rate:
        return None
    return (baseline_rate / rate - 1) * 100


def failures(run: RunRecord) -> list[dict[str, Any]]:
    """Every kill: member kills and stage losses, in time order."""
    return [e for e in run.events if e.get("kind") == "failure"]


def is_member_loss(failure: dict[str, Any]) -> bool:
    """One member of a stage group killed (the group carried on); else the stage was lost."""
    return failure.get("loss") == "member"


def member_kills(run: RunRecord) -> list[dict[str, Any]]:
    return [f for f in failures(run) if is_member_loss(f)]


def stage_losses(run: RunRecord) -> list[dict[str, Any]]:
    return [f for f in failures(run) if not is_member_loss(f)]


def recoveries(run: RunRecord) -> list[dict[str, Any]]:
    """The rebuilds (`recovery_finished`: CheckFree or the strategy's own); an exact join is never one."""
    return [e for e in run.events if e.get("kind") == "recovery"]


def joins(run: RunRecord) -> list[dict[str, Any]]:
    """The exact copies: newcomers that joined a live group by copying a member (`joined_group`)."""
    return [e for e in run.events if e.get("kind") == "join"]


def match_recoveries(run: RunRecord) -> list[int | None]:
    """Per failure, the index in `recoveries(run)` of its rebuild: for a stage loss, the first recovery of the
    same stage at or after the kill that no earlier failure claimed (None: never rebuilt); a member loss is
    never rebuilt (None)."""
    recs = recoveries(run)
    used: set[int] = set()
    out: list[int | None] = []
    for f in failures(run):
        match = None if is_member_loss(f) else next(
            (j for j, r in enumerate(recs) if j not in used and r.get("stage") == f.get("stage")
             and r["time_s"] >= f["time_s"]), None)
        if match is not None:
            used.add(match)
        out.append(match)
    return out


def refills(run: RunRecord) -> list[list[int]]:
    """Per failure, the indices in `joins(run)` of the exact copies that refilled its stage's group: joins of
    the same stage from the kill until the next kill of that stage. The others (`other_copies`) are the groups
    forming at start-up, or a member that re-joined without a kill of its stage (dropped under load)."""
    fails, js = failures(run), joins(run)
    out: list[list[int]] = []
    for i, f in enumerate(fails):
        until = next((g["time_s"] for g in fails[i + 1:] if g.get("stage") == f.get("stage")), math.inf)
        out.append([j for j, e in enumerate(js) if e.get("stage") == f.get("stage")
                    and f["time_s"] <= e["time_s"] < until])
    return out


def other_copies(run: RunRecord) -> int:
    """Exact copies that followed no kill of their stage: the groups forming, or a re-join."""
    refilled = {j for idx in refills(run) for j in idx}
    return sum(1 for j in range(len(joins(run))) if j not in refilled)


def downtimes(run: RunRecord) -> list[float | None]:
    """Per failure: seconds from the kill to the first step committed after its rebuild (detection, a spare
    taking over, the rebuild, the retried step), or for a member loss after the kill itself (the group carried
    on without the member: the aborted attempt and its retry). A step already in flight that commits right
    after a stage loss's kill does not end the downtime. None if no step followed."""
    recs = recoveries(run)
    out: list[float | None] = []
    for f, match in zip(failures(run), match_recoveries(run), strict=True):
        ready = recs[match]["time_s"] if match is not None else f["time_s"]
        later = [s["time_s"] for s in run.steps if s["time_s"] > ready]
        out.append(min(later) - f["time_s"] if later else None)
    return out


def recovery_penalties(run: RunRecord, baseline: RunRecord | None) -> list[float | None]:
    """Per recovery: the run's first validation loss after the rebuild minus the baseline's validation loss at
    the same step (linearly interpolated between the baseline's validation steps; None outside them)."""
    if baseline is None:
        return [None for _ in recoveries(run)]
    curve = sorted((float(step), v) for _, step, v in val_points(baseline))
    points = val_points(run)
    out: list[float | None] = []
    for r in recoveries(run):
        after = [(step, v) for t, step, v in points if t >= r["time_s"]]
        ref = interpolate(curve, after[0][0]) if after else None
        out.append(None if ref is None else after[0][1] - ref)
    return out


def default_target(runs: Sequence[RunRecord], margin: float = DEFAULT_TARGET_MARGIN) -> float | None:
    """The failure-free run's final validation loss times (1 + margin); None without such a run."""
    for run in runs:
        if run.strategy == BASELINE_STRATEGY:
            pts = val_points(run)
            if pts and math.isfinite(pts[-1][2]):
                return pts[-1][2] * (1 + margin)
    return None


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _max(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return max(vals) if vals else None


def summarize(runs: Sequence[RunRecord], target: float | None) -> list[dict[str, Any]]:
    """One row per run: the figures of results.md (definitions in docs/experiments.md)."""
    baseline = next((r for r in runs if r.strategy == BASELINE_STRATEGY), None)
    base_rate = steps_per_s(baseline) if baseline else None
    ttt = {id(r): (time_to_target([(t, v) for t, _, v in val_points(r)], target) if target is not None else None)
           for r in runs}
    reference = {r.level: ttt[id(r)] for r in runs if r.strategy == REFERENCE_STRATEGY}
    rows = []
    for run in runs:
        pts = val_points(run)
        rebuilds = [e.get("duration_s") for e in recoveries(run)]
        waits = downtimes(run)
        fails = failures(run)
        refilled = sum(len(idx) for idx in refills(run))
        penalties = recovery_penalties(run, baseline) if run.strategy != BASELINE_STRATEGY else []
        own, ref = ttt[id(run)], reference.get(run.level)
        if run is baseline:
            overhead = 0.0 if base_rate else None
        else:
            overhead = overhead_pct(steps_per_s(run), base_rate)
        rows.append({
            "strategy": run.strategy, "level": run.level, "rate": run.rate, "p": run.p, "status": run.status,
            "steps": run.steps[-1]["step"] if run.steps else 0,
            "wall_s": wall_clock_s(run),
            "steps_per_s": steps_per_s(run),
            "overhead_pct": overhead,
            "final_val_loss": pts[-1][2] if pts else None,
            "time_to_target_s": own,
            "ttt_vs_checkfree": own / ref if own is not None and ref and run.level is not None else None,
            "failures": len(fails),
            "member_kills": len(member_kills(run)),
            "stage_losses": len(stage_losses(run)),
            "nodes_killed": sum(len(f.get("nodes") or [None]) for f in fails),
            "exact_copies": len(joins(run)),
            "refill_copies": refilled,
            "other_copies": len(joins(run)) - refilled,
            "rebuilds": len(rebuilds),
            "rebuild_mean_s": _mean(rebuilds),
            "rebuild_max_s": _max(rebuilds),
            "downtime_mean_s": _mean([w for f, w in zip(fails, waits, strict=True) if not is_member_loss(f)]),
            "member_downtime_mean_s": _mean([w for f, w in zip(fails, waits, strict=True) if is_member_loss(f)]),
            "penalty_mean": _mean(penalties),
            "penalty_max": _max(penalties),
        })
    return rows


def failure_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per injected failure: where, when, member or stage, what its rebuild cost (a stage loss) and the
    exact copies that refilled the group."""
    baseline = next((r for r in runs if r.strategy == BASELINE_STRATEGY), None)
    out = []
    for run in runs:
        recs, js = recoveries(run), joins(run)
        penalties = recovery_penalties(run, baseline)
        waits = downtimes(run)
        for f, match, wait, copies in zip(failures(run), match_recoveries(run), waits, refills(run), strict=True):
            member = is_member_loss(f)
            how = recs[match].get("how") if match is not None else None
            out.append({"strategy": run.strategy, "level": run.level, "stage": f.get("stage"),
                        "loss": "member" if member else "stage", "nodes_killed": len(f.get("nodes") or [None]),
                        "planned_step": f.get("planned_step"), "step": f.get("step"), "time_s": f["time_s"],
                        "rebuild_s": recs[match].get("duration_s") if match is not None else None,
                        "fetch_s": recs[match].get("fetch_s") if match is not None else None,
                        "how": "routed-around" if member else how,
                        "exact_copies": len(copies),
                        "copy_s": _max([js[j].get("duration_s") for j in copies]),
                        "downtime_s": wait,
                        "penalty": penalties[match] if match is not None else None})
    return out


# -- writers --------------------------------------------------------------------------------------------------


def write_report(out_dir: str, runs: Sequence[RunRecord], *, target: float | None = None,
                 meta: dict[str, Any] | None = None, schedules: Sequence[dict[str, Any]] = ()) -> dict[str, str]:
    """Write the four report files into `out_dir`; returns their paths by kind. `target` None: the default
    target (failure-free final validation loss + 2 %), if there is a failure-free run."""
    os.makedirs(out_dir, exist_ok=True)
    target_given = target is not None
    if target is None:
        target = default_target(runs)
    rows = summarize(runs, target)
    fails = failure_rows(runs)
    meta = {**(meta or {}), "target_val_loss": target,
            "target_source": "given" if target_given else
            (f"failure-free final val loss + {DEFAULT_TARGET_MARGIN:.0%}" if target is not None else "none")}
    paths = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "md": os.path.join(out_dir, "results.md"), "png": os.path.join(out_dir, "loss_vs_time.png")}
    write_csv(paths["csv"], runs)
    write_json(paths["json"], {"format": REPORT_FORMAT, "meta": meta, "summary": rows, "failures": fails,
                               "runs": [r.to_dict() for r in runs], "schedules": list(schedules)})
    write_markdown(paths["md"], rows, fails, meta)
    write_plot(paths["png"], runs, target)
    logger.info("report written: %s", ", ".join(paths.values()))
    return paths


CSV_COLUMNS = ("strategy", "level", "rate_pct", "p", "step", "time_s", "train_loss", "val_loss")


def write_csv(path: str, runs: Sequence[RunRecord]) -> None:
    """One row per run and validation point."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for run in runs:
            for s in run.steps:
                if s.get("val_loss") is None:
                    continue
                w.writerow([run.strategy, run.level or "", "" if run.rate is None else run.rate,
                            "" if run.p is None else run.p, s["step"], round(float(s["time_s"]), 3),
                            s.get("loss"), s["val_loss"]])


def _clean(x: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(payload), f, indent=2, allow_nan=False)


def _f(x: float | None, fmt: str, missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


SUMMARY_HEADER = ("strategy", "rate", "steps", "wall-clock (s)", "steps/s", "overhead vs none",
                  "final val loss", "time to target (s)", "vs checkfree", "member kills", "stage losses",
                  "exact copies (refill + other)", "rebuilds", "rebuild s (mean / max)",
                  "downtime s (stage loss / member)", "val loss penalty after recovery (mean / max)", "status")
LEFT_ALIGNED = ("strategy", "rate", "status")


def summary_line(row: dict[str, Any], target: float | None) -> str:
    """The results.md table row of one summary row."""
    if target is None:
        ttt = "no target"
    else:
        ttt = _f(row["time_to_target_s"], ".1f", "not reached")
    overhead = "–" if row["overhead_pct"] is None else f"{row['overhead_pct']:+.1f}%"
    ratio = "–" if row["ttt_vs_checkfree"] is None else f"{row['ttt_vs_checkfree']:.2f}x"
    rebuild = "–" if row["rebuild_mean_s"] is None else f"{row['rebuild_mean_s']:.2f} / {row['rebuild_max_s']:.2f}"
    penalty = "–" if row["penalty_mean"] is None else f"{row['penalty_mean']:+.4f} / {row['penalty_max']:+.4f}"
    downtime = f"{_f(row['downtime_mean_s'], '.1f')} / {_f(row['member_downtime_mean_s'], '.1f')}"
    cells = [row["strategy"], row["level"] or "–", str(row["steps"]), _f(row["wall_s"], ".1f"),
             _f(row["steps_per_s"], ".3f"), overhead, _f(row["final_val_loss"], ".4f"), ttt, ratio,
             str(row["member_kills"]), str(row["stage_losses"]),
             f"{row['refill_copies']} + {row['other_copies']}", str(row["rebuilds"]), rebuild, downtime, penalty,
             row["status"]]
    return "| " + " | ".join(cells) + " |"


def write_markdown(path: str, rows: Sequence[dict[str, Any]], fails: Sequence[dict[str, Any]],
                   meta: dict[str, Any]) -> None:
    target = meta.get("target_val_loss")
    lines = ["# cfnode experiment results", ""]
    lines += [f"* {k}: {format(v, '.6g') if isinstance(v, float) else v}" for k, v in meta.items()
              if not isinstance(v, (dict, list))]
    lines += ["", "## Summary", "",
              "| " + " | ".join(SUMMARY_HEADER) + " |",
              "|" + "|".join("---" if h in LEFT_ALIGNED else "---:" for h in SUMMARY_HEADER) + "|"]
    lines += [summary_line(row, target) for row in rows]
    lines += ["", "Wall-clock: training start to the last committed step. Overhead: extra seconds per step "
              "relative to the failure-free run. Time to target: first time the validation loss reaches the "
              "target, interpolated between validation points. Member kills: one member of a stage group killed "
              "(the group carries on); stage losses: the whole stage (its group, or its one node). Exact copies: "
              "newcomers that joined a live group by copying a member, after a kill of the stage (refill) or "
              "otherwise (the groups forming, a member re-joining); never counted as rebuilds. Downtime: kill to the first step committed after "
              "its rebuild (a member kill: after the kill). "
              "Penalty: first validation loss after a rebuild minus the failure-free run's at the same step. "
              "Definitions: docs/experiments.md.", ""]
    lines += ["## Failures", ""]
    if fails:
        lines += ["| strategy | rate | stage | loss | planned step | killed at step | time (s) | repaired by "
                  "| rebuild (s) | fetch (s) | exact copies (max s) | downtime (s) | penalty |",
                  "|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for f in fails:
            copies = f"{f['exact_copies']} ({_f(f['copy_s'], '.2f')})" if f["exact_copies"] else "0"
            lines.append("| " + " | ".join([
                f["strategy"], f["level"] or "–", str(f["stage"]), f["loss"],
                str(f["planned_step"] if f["planned_step"] is not None else "–"),
                str(f["step"]), _f(f["time_s"], ".1f"), f["how"] or "–", _f(f["rebuild_s"], ".2f"),
                _f(f["fetch_s"], ".2f"), copies, _f(f["downtime_s"], ".1f"), _f(f["penalty"], "+.4f")]) + " |")
    else:
        lines.append("No failures were injected.")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _colours(strategies: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    out: dict[str, Any] = {BASELINE_STRATEGY: "black"}
    for s in strategies:
        if s not in out:
            out[s] = palette[(len(out) - 1) % len(palette)]
    return out


def write_plot(path: str, runs: Sequence[RunRecord], target: float | None) -> None:
    """Validation loss vs wall-clock, one panel per failure level (the failure-free run on each); failures are
    dotted vertical lines and markers on the curve in the run's colour: x a stage lost, + a member killed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(dict.fromkeys(r.level for r in runs if r.level is not None)) or [None]
    colours = _colours([r.strategy for r in runs])
    fig, axes = plt.subplots(1, len(levels), figsize=(6.4 * len(levels), 4.8), sharey=True, squeeze=False)
    for ax, level in zip(axes[0], levels, strict=True):
        for run in runs:
            if run.level != level and run.strategy != BASELINE_STRATEGY:
                continue
            pts = [(t, v) for t, _, v in val_points(run)]
            if not pts:
                continue
            colour = colours[run.strategy]
            style = "--" if run.strategy == BASELINE_STRATEGY else "-"
            ax.plot([t for t, _ in pts], [v for _, v in pts], style, color=colour, label=run.strategy, marker=".",
                    markersize=3)
            for f in failures(run):
                member = is_member_loss(f)
                ax.axvline(f["time_s"], color=colour, linestyle=":", alpha=0.25 if member else 0.5, linewidth=1)
                y = interpolate(pts, f["time_s"])
                if y is not None:
                    ax.plot([f["time_s"]], [y], "+" if member else "x", color=colour, markersize=8,
                            markeredgewidth=1.5 if member else 2)
        if target is not None:
            ax.axhline(target, color="grey", linewidth=0.8, alpha=0.6, label=f"target {target:.3f}")
        ax.set_title(f"failure rate {level}" if level else "no failures")
        ax.set_xlabel("wall-clock since training started (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss")
    fig.suptitle("validation loss vs wall-clock (x: stage lost, +: one member of a group killed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
