"""The seeded rule ablation (docs/experiments.md): several `cfnode experiment` outputs, one per seed, reduced to
one small raw file and a report with 95 % intervals over seeds.

`compact` keeps of each run only what the ablation needs (validation points, failures, rebuilds); the
pure functions below compute from that, so the committed raw file alone reproduces the report:

* final validation loss of each rule (the mean of its last five validations), and its paired penalty: the
  run's final validation loss minus the failure-free run's of the same seed (same initial weights, data order
  and schedule seed);
* per-rebuild penalty: the run's validation loss just after a rebuild minus just before its failure, less
  what the failure-free run of the same seed changed between the same two steps (so training progress and
  the damage of earlier failures cancel);
* second-half gap: the mean, over the validations of the run's second half, of its loss minus the failure-free
  run's at the same step (what the failures cost while training goes on);
* the separability criterion: the `random` rule's mean penalty against 5x the seed-to-seed standard
  deviation of the failure-free run (of its final loss, or of its second-half mean for the gap).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

RAW_FORMAT = 1
BASELINE = "none"
CRITERION_RULE = "random"
CRITERION_FACTOR = 5.0
FINAL_POINTS = 5
ORDER = ("none", "checkfree", "uniform-avg", "copy", "random", "checkfree+")
"""Report order; `checkfree` is CheckFree's weighted (grad-avg) rule."""

Run = dict[str, Any]
"""A compact run: strategy, val [[step, time_s, loss]...], failures [[step, time_s, stage]...],
rebuilds [[step, time_s, stage, how]...], status."""


# -- raw file ------------------------------------------------------------------------------------------------


def compact(results: Mapping[str, Any]) -> list[Run]:
    """The runs of one experiment's results.json, reduced to what the ablation reads."""
    out = []
    for r in results["runs"]:
        val = [[int(s["step"]), float(s["time_s"]), float(s["val_loss"])] for s in r["steps"]
               if s.get("val_loss") is not None]
        fails = [[int(e["step"]), float(e["time_s"]), int(e["stage"])] for e in r["events"]
                 if e.get("kind") == "failure"]
        rebuilds = [[int(e["step"]), float(e["time_s"]), int(e["stage"]), str(e.get("how"))] for e in r["events"]
                    if e.get("kind") == "recovery"]
        out.append({"strategy": r["strategy"], "status": r["status"], "val": val, "failures": fails,
                    "rebuilds": rebuilds})
    return out


def read_experiments(dirs: Sequence[str]) -> dict[str, Any]:
    """The raw ablation file's payload from experiment output directories (one seed each)."""
    seeds: dict[str, Any] = {}
    settings: dict[str, Any] | None = None
    for d in dirs:
        with open(os.path.join(d, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        options = dict(results["meta"]["options"])
        seed = int(options.pop("seed"))
        for k in ("out", "jobs", "strategies"):
            options.pop(k, None)
        if settings is None:
            settings = options
        elif options != settings:
            diff = sorted(k for k in set(options) | set(settings) if options.get(k) != settings.get(k))
            raise ValueError(f"{d} was run with other settings than {dirs[0]}: {', '.join(diff)}")
        if str(seed) in seeds:
            raise ValueError(f"seed {seed} appears twice ({d})")
        seeds[str(seed)] = compact(results)
    return {"format": RAW_FORMAT, "settings": settings or {}, "seeds": seeds}


# -- statistics ----------------------------------------------------------------------------------------------


def _ordered(names: Iterable[str]) -> list[str]:
    """Rules in report order (ORDER first, any other after, by name)."""
    return sorted(names, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s))


def mean_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """(mean, half-width of the Student-t interval); half-width NaN for a single value; None for none."""
    from scipy import stats

    if not xs:
        return None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    half = stats.t.ppf(0.5 + confidence / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, float(half)


def final_val(run: Run) -> float | None:
    """The mean of the last FINAL_POINTS validations: one validation swings by a few hundredths from one to the
    next (the curve is not smooth step to step), which would otherwise dominate the seed-to-seed spread."""
    tail = [p[2] for p in run["val"][-FINAL_POINTS:]]
    return statistics.fmean(tail) if tail else None


def _at_step(val: Sequence[Sequence[float]], step: float) -> float | None:
    """The validation loss interpolated linearly at `step` (None outside the points)."""
    from cfnode.experiment.report import interpolate

    return interpolate(sorted((p[0], p[2]) for p in val), step)


def second_half(run: Run) -> list[Sequence[float]]:
    """The validation points in the second half of the run's steps."""
    if not run["val"]:
        return []
    last = max(p[0] for p in run["val"])
    return [p for p in run["val"] if p[0] >= last / 2]


def window_mean(run: Run) -> float | None:
    """The mean validation loss over the second half of the run."""
    pts = second_half(run)
    return statistics.fmean(p[2] for p in pts) if pts else None


def window_gap(run: Run, baseline: Run) -> float | None:
    """The mean over the run's second-half validations of its loss minus the failure-free run's at the same
    step: what the failures cost while training goes on, less noisy than one final point."""
    gaps = [p[2] - b for p in second_half(run) if (b := _at_step(baseline["val"], p[0])) is not None]
    return statistics.fmean(gaps) if gaps else None


def rebuild_penalties(run: Run, baseline: Run) -> list[float]:
    """Per rebuild that has validation points on both sides (see the module's docstring)."""
    out = []
    fails = sorted(run["failures"], key=lambda f: f[1])
    for _step, t, stage, _how in run["rebuilds"]:
        failure = [f for f in fails if f[1] <= t and f[2] == stage]
        if not failure:
            continue
        t_fail = failure[-1][1]
        before = [p for p in run["val"] if p[1] < t_fail]
        after = [p for p in run["val"] if p[1] >= t]
        if not before or not after:
            continue
        b0, b1 = _at_step(baseline["val"], before[-1][0]), _at_step(baseline["val"], after[0][0])
        if b0 is None or b1 is None:
            continue
        out.append((after[0][2] - before[-1][2]) - (b1 - b0))
    return out


def summarize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Per rule: seeds, final validation loss, paired final penalty and per-rebuild penalty (each mean and 95 %
    half-width), rebuild count; and the criterion."""
    seeds = raw["seeds"]
    base = {s: next(r for r in runs if r["strategy"] == BASELINE) for s, runs in seeds.items()}
    strategies = _ordered({r["strategy"] for runs in seeds.values() for r in runs})
    rows = []
    for name in strategies:
        finals, paired, windows, gaps, per_rebuild, rebuilds, statuses = [], [], [], [], [], 0, []
        for s, runs in seeds.items():
            for r in runs:
                if r["strategy"] != name:
                    continue
                statuses.append(r["status"])
                v, b = final_val(r), final_val(base[s])
                if v is not None:
                    finals.append(v)
                    if b is not None:
                        paired.append(v - b)
                if (w := window_mean(r)) is not None:
                    windows.append(w)
                if name != BASELINE and (g := window_gap(r, base[s])) is not None:
                    gaps.append(g)
                rebuilds += len(r["rebuilds"])
                if name != BASELINE:
                    per_rebuild.extend(rebuild_penalties(r, base[s]))
        rows.append({"strategy": name, "seeds": len(finals), "final": mean_interval(finals),
                     "final_penalty": mean_interval(paired) if name != BASELINE else None,
                     "window": mean_interval(windows), "window_gap": mean_interval(gaps) if name != BASELINE else None,
                     "rebuild_penalty": mean_interval(per_rebuild), "rebuilds": rebuilds,
                     "measured_rebuilds": len(per_rebuild), "statuses": sorted(set(statuses))})
    def sd(xs: list[float | None]) -> float:
        vals = [x for x in xs if x is not None]
        return statistics.stdev(vals) if len(vals) >= 2 else math.nan

    by_name = {r["strategy"]: r for r in rows}
    criterion: dict[str, Any] = {"factor": CRITERION_FACTOR, "rule": CRITERION_RULE,
                                 "baseline_sd": sd([final_val(r) for r in base.values()]),
                                 "baseline_window_sd": sd([window_mean(r) for r in base.values()])}
    for kind, spread in (("final_penalty", "baseline_sd"), ("rebuild_penalty", "baseline_sd"),
                         ("window_gap", "baseline_window_sd")):
        pen, limit = by_name.get(CRITERION_RULE, {}).get(kind), criterion[spread]
        criterion[kind] = pen[0] if pen else None
        criterion[f"{kind}_met"] = bool(pen and math.isfinite(limit) and pen[0] > CRITERION_FACTOR * limit)
    return {"rows": rows, "criterion": criterion}


def mean_curves(raw: Mapping[str, Any]) -> dict[str, tuple[list[int], list[float], list[float], list[float]]]:
    """Per rule: (steps, mean, min, max) of the validation loss over seeds, at the steps every seed validated."""
    out = {}
    names = {r["strategy"] for runs in raw["seeds"].values() for r in runs}
    for name in names:
        curves = [{int(p[0]): p[2] for p in r["val"]} for runs in raw["seeds"].values() for r in runs
                  if r["strategy"] == name]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        vals = [[c[s] for c in curves] for s in steps]
        out[name] = (steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals])
    return out


# -- report --------------------------------------------------------------------------------------------------


def _pm(x: tuple[float, float] | None, fmt: str) -> str:
    if x is None:
        return "–"
    m, h = x
    return f"{m:{fmt}} ± {h:.4f}" if math.isfinite(h) else f"{m:{fmt}}"


def markdown(summary: Mapping[str, Any], settings: Mapping[str, Any], seeds: Sequence[str]) -> str:
    c = summary["criterion"]
    lines = ["| rule | seeds | final val loss | final − failure-free | second half: mean val loss | second half: "
             "mean gap to failure-free | per-rebuild penalty | rebuilds (measured) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['strategy']} | {r['seeds']} | {_pm(r['final'], '.4f')} | "
                     f"{_pm(r['final_penalty'], '+.4f')} | {_pm(r['window'], '.4f')} | {_pm(r['window_gap'], '+.4f')} | "
                     f"{_pm(r['rebuild_penalty'], '+.4f')} | {r['rebuilds']} ({r['measured_rebuilds']}) | "
                     f"{', '.join(r['statuses'])} |")
    sd, wsd = c["baseline_sd"], c["baseline_window_sd"]
    verdict = {True: "met", False: "not met"}
    lines += ["", f"Seeds {', '.join(seeds)}; ± is the 95 % Student t half-width over seeds (per-rebuild penalty: "
              "over all measured rebuilds). Final val loss: the mean of the last five validations.", "",
              f"Criterion (`{c['rule']}`'s mean penalty > {c['factor']:g} × the failure-free run's seed-to-seed SD): "
              f"final − failure-free {_fmt(c['final_penalty'])} against {c['factor'] * sd:.4f} "
              f"({verdict[c['final_penalty_met']]}); per-rebuild penalty {_fmt(c['rebuild_penalty'])} against "
              f"{c['factor'] * sd:.4f} ({verdict[c['rebuild_penalty_met']]}); second-half mean gap "
              f"{_fmt(c['window_gap'])} against {c['factor'] * wsd:.4f} (SD of the failure-free second-half mean "
              f"{wsd:.4f}; {verdict[c['window_gap_met']]}).", "",
              "Settings: " + ", ".join(f"{k} {v}" for k, v in sorted(settings.items())
                                       if k in ("preset_name", "stages", "steps", "probabilities", "microbatches",
                                                "microbatch_size", "lr", "val_every", "min_gap", "engine"))]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:+.4f}"


def plot(path: str, raw: Mapping[str, Any]) -> None:
    """Validation loss vs step, one line per rule (mean over seeds) with a band from the lowest to the highest
    seed, like the paper's Fig 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(raw)
    names = _ordered(curves)
    palette = matplotlib.colormaps["tab10"].colors
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, name in enumerate(names):
        steps, mean, lo, hi = curves[name]
        colour = "black" if name == BASELINE else palette[i % len(palette)]
        label = "checkfree (grad-avg)" if name == "checkfree" else name
        for a in (ax, zoom):
            a.plot(steps, mean, "--" if name == BASELINE else "-", color=colour, label=label, linewidth=1.2)
            a.fill_between(steps, lo, hi, color=colour, alpha=0.12, linewidth=0)
    last = max(max(c[0]) for c in curves.values())
    zoom.set_xlim(last * 0.5, last)
    tail = [v for c in curves.values() for s, v in zip(c[0], c[3], strict=True) if s >= last * 0.5]
    floor = [v for c in curves.values() for s, v in zip(c[0], c[2], strict=True) if s >= last * 0.5]
    if tail and floor:
        zoom.set_ylim(min(floor) - 0.02, max(tail) + 0.02)
    for a, title in ((ax, "validation loss"), (zoom, "second half")):
        a.set_xlabel("step")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax.set_ylabel("validation loss (mean over seeds; band: min..max)")
    ax.legend(fontsize=8)
    fig.suptitle(f"rule ablation: {len(raw['seeds'])} seeds, p = "
                 f"{', '.join(str(p) for p in raw['settings'].get('probabilities', []))} per stage per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: str, raw: Mapping[str, Any]) -> dict[str, str]:
    """raw.json, ablation.md, ablation.json and ablation.png in `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    summary = summarize(raw)
    paths = {k: os.path.join(out, f) for k, f in (("raw", "raw.json"), ("md", "ablation.md"),
                                                  ("json", "ablation.json"), ("png", "ablation.png"))}
    with open(paths["raw"], "w", encoding="utf-8") as f:
        json.dump(raw, f, separators=(",", ":"))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=lambda x: None)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(summary, raw["settings"], sorted(raw["seeds"], key=int)))
    plot(paths["png"], raw)
    logger.info("ablation report written: %s", ", ".join(paths.values()))
    return paths
