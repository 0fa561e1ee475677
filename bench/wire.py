#!/usr/bin/env python
"""What a compressed hop costs in validation loss and saves in bytes: one cfnode swarm per `--wire-dtype`,
same seed, same data, same schedule, trained side by side for `--steps` steps.

Each run is `bench/throughput.py`'s swarm setup (bootstrap + L+1 `cfnode join` processes on 127.0.0.1, one
torch thread each) with `--wire-dtype D --val-every V`. Reported per wire dtype: activation and gradient bytes
sent per step (cfnode_transfer_bytes_total summed over the nodes, over the steps after the warmup), their ratio
to float32, the validation loss at the last step and its difference from float32, the training loss's largest
difference from float32, and tokens/s (informative only: the runs share the machine with nothing else, but a
run is not a throughput benchmark).

    python bench/wire.py --preset small --stages 4 --steps 200 --json bench/results-wire-small-L4.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import tempfile

from revision import git_revision  # bench/revision.py (bench/ is on sys.path when a script runs)
from throughput import max_loss_diff, run_swarm  # bench/throughput.py

from cfnode.config import WIRE_DTYPES, TrainConfig, preset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200, help="steps per run (validated at the last one)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before bytes are counted")
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--microbatch-size", type=int, default=8)
    parser.add_argument("--max-in-flight", type=int, default=TrainConfig.max_in_flight)
    parser.add_argument("--wire-dtypes", default="float32,float16,uint8",
                        help=f"comma-separated, float32 first (the reference); from {', '.join(WIRE_DTYPES)}")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    dtypes = [d.strip() for d in args.wire_dtypes.split(",") if d.strip()]
    if not dtypes or dtypes[0] != "float32" or set(dtypes) - set(WIRE_DTYPES):
        parser.error(f"--wire-dtypes: float32 first, then any of {', '.join(WIRE_DTYPES)}")
    if args.steps % args.val_every:
        parser.error("--steps must be a multiple of --val-every (the last step is validated)")

    cfg = preset(args.preset, num_stages=args.stages)
    train = TrainConfig(num_microbatches=args.microbatches, microbatch_size=args.microbatch_size,
                        max_in_flight=args.max_in_flight, val_every=args.val_every)
    workdir = args.workdir or tempfile.mkdtemp(prefix="cfnode-wire-")
    revision = git_revision()
    rows = []
    for dtype in dtypes:
        print(f"running the swarm with --wire-dtype {dtype} ...", flush=True)
        rundir = os.path.join(workdir, dtype)
        os.makedirs(rundir, exist_ok=True)
        res = run_swarm(cfg, train, args.steps, args.warmup, rundir, args.timeout,
                        extra_join=("--wire-dtype", dtype))
        sent = res.extra.get("bytes_sent_per_step", {})
        rows.append({"wire_dtype": dtype, "tokens_per_s": res.tokens_per_s, "losses": res.losses,
                     "val_losses": res.extra["val_losses"],
                     "hop_bytes_per_step": sum(sent.get(k, 0) for k in ("activations", "gradients")),
                     "bytes_sent_per_step": sent})
        print(f"  val loss at step {args.steps}: {res.extra['val_losses'].get(args.steps)}, "
              f"hop bytes/step {rows[-1]['hop_bytes_per_step']:,}", flush=True)
    ref = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["hop_bytes_per_step"] / ref["hop_bytes_per_step"]
        row["val_loss_delta"] = row["val_losses"][args.steps] - ref["val_losses"][args.steps]
        row["max_abs_loss_diff"] = max_loss_diff(ref["losses"], row["losses"])
    print(f"\n| wire dtype | hop bytes/step | vs float32 | val loss @{args.steps} | Δ val loss | "
          "max |Δ train loss| | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['wire_dtype']} | {row['hop_bytes_per_step']:,} | {row['bytes_ratio']:.3f}x | "
              f"{row['val_losses'][args.steps]:.4f} | {row['val_loss_delta']:+.4f} | "
              f"{row['max_abs_loss_diff']:.4f} | {row['tokens_per_s']:.0f} |")
    if args.json:
        payload = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "cfnode_revision": revision, "preset": args.preset, "stages": args.stages,
                   "steps": args.steps, "warmup_steps": args.warmup, "val_every": args.val_every,
                   "train": {"num_microbatches": train.num_microbatches,
                             "microbatch_size": train.microbatch_size, "max_in_flight": train.max_in_flight},
                   "runs": rows}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
