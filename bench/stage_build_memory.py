"""Peak RSS of building one stage from a local checkpoint: the lean build (`build_stage`: only the stage's tensors,
read from safetensors) against loading the whole model and cutting the stage out (what `build_stage` did before).

Writes two float32 checkpoints into a temporary directory: the medium preset (L = 4 stages of 3 layers) and one
with the same widths and 4x the layers (L = 16 stages of 3 layers, so stage 2 is the same size in both). Each
build runs in a fresh interpreter that imports everything, reads the checkpoint's config and builds the
stage's module on the meta device (so the modeling code is loaded, ~10 MiB); its baseline is the peak RSS at
that point (VmHWM), its cost the rise of the peak over the build, with every tensor of the stage touched.

    .venv/bin/python bench/stage_build_memory.py [--stage 2] [--out bench/results-stage-build-memory.json]

Acceptance (issue 12): lean peak <= baseline + 1.3 x the stage's float32 parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("lean", "whole")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM): unlike `ru_maxrss`, not inherited from the parent across fork/exec."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(path: str, stages: int, stage: int, method: str) -> dict:
    """Runs in a fresh interpreter: build one stage by `method`, report RSS figures."""
    import torch
    from transformers import LlamaConfig

    from cfnode.model.checkpoint import stage_module
    from cfnode.model.stages import build_stage, cut_stage, load_pretrained, model_config_from_pretrained

    torch.set_num_threads(1)
    cfg = model_config_from_pretrained(path, stages)
    stage_module(LlamaConfig.from_pretrained(path), stage, stages)  # the runtime: modeling code loaded, no tensors
    baseline = peak_rss()
    if method == "lean":
        module = build_stage(cfg, stage, path)
    else:
        module = cut_stage(load_pretrained(path), stages, stage)
    with torch.no_grad():  # every page of the stage touched, as training will (mapped file pages count then)
        touched = sum(float(t.float().sum()) for t in module.state_dict().values())
    peak = peak_rss()
    stage_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return {"method": method, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "rise_bytes": peak - baseline, "stage_bytes": stage_bytes,
            "rise_over_stage": round((peak - baseline) / stage_bytes, 3), "checksum": touched}


def write_checkpoint(path: str, num_layers: int) -> int:
    """A seeded float32 checkpoint with the medium preset's widths and `num_layers` layers; its parameter bytes."""
    from cfnode.config import preset
    from cfnode.model.stages import build_llama

    model = build_llama(preset("medium", num_stages=num_layers // 3, layers_per_stage=3))
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, metavar=("PATH", "STAGES", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, stages, method = args.child
        print(json.dumps(child(path, int(stages), args.stage, method)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="cfnode-bench-stage-build-") as tmp:
        for name, layers in (("medium", 12), ("medium-4x-layers", 48)):
            path = os.path.join(tmp, name)
            model_bytes = write_checkpoint(path, layers)
            for method in METHODS:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--stage", str(args.stage),
                                      "--child", path, str(layers // 3), method],
                                     check=True, capture_output=True, text=True).stdout
                row = {"checkpoint": name, "layers": layers, "stages": layers // 3, "stage": args.stage,
                       "model_bytes": model_bytes, **json.loads(out.strip().splitlines()[-1])}
                row["meets_1_3x"] = row["rise_bytes"] <= 1.3 * row["stage_bytes"]
                rows.append(row)
    mib = 2 ** 20
    print(f"{'checkpoint':18} {'method':6} {'model MiB':>9} {'stage MiB':>9} {'baseline MiB':>12} {'peak MiB':>9} "
          f"{'rise MiB':>9} {'rise/stage':>10}")
    for r in rows:
        print(f"{r['checkpoint']:18} {r['method']:6} {r['model_bytes'] / mib:9.1f} {r['stage_bytes'] / mib:9.1f} "
              f"{r['baseline_rss_bytes'] / mib:12.1f} {r['peak_rss_bytes'] / mib:9.1f} {r['rise_bytes'] / mib:9.1f} "
              f"{r['rise_over_stage']:10.2f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
