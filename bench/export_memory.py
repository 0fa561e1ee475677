"""Peak memory of `cfnode export` against a live swarm (default: preset medium, L = 4, held at step 0).

Starts a bootstrap and L + 1 nodes on 127.0.0.1 (stage 0 holds before its first step, so the stages stay put),
then exports in THIS process with `cfnode.export.export_swarm` and reports how far the process's peak RSS rose
above its RSS right before the export (everything imported, nothing fetched), against the model's float32
parameter bytes. The exporter's DHT/p2pd children are separate processes and hold no tensors.

    .venv/bin/python bench/export_memory.py [--preset medium] [--stages 4] [--out results-export-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil

from cfnode.config import preset
from cfnode.export import ExportOptions, export_peer_id, export_swarm, stage_bytes
from cfnode.localswarm import JOIN_LINE, Swarm, read_events, wait_for_line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = preset(args.preset, num_stages=args.stages)
    param_bytes = sum(stage_bytes(cfg, i) for i in range(cfg.num_stages + 1))
    workdir = tempfile.mkdtemp(prefix="cfnode-bench-export-")
    reader = os.path.join(workdir, "exporter.id")
    me = export_peer_id(reader)
    swarm = Swarm(workdir)
    try:
        boot = swarm.spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity-path",
                                         os.path.join(workdir, "boot.id")])
        peer = wait_for_line(boot, JOIN_LINE, 60).group(1)
        common = ["join", "--peers", peer, "--run-id", "bench", "--preset", args.preset, "--stages", str(args.stages),
                  "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--weights-reader", me]
        nodes = [swarm.spawn(f"stage{i}", [*common, "--stage", str(i), *(["--debug-hold-at-step", "0"] if i == 0
                                                                         else [])], events=True)
                 for i in range(args.stages + 1)]
        deadline = time.monotonic() + 600
        while not all(any(e["event"] == "online" for e in read_events(n.events_path)) for n in nodes):
            if time.monotonic() > deadline or not all(n.alive() for n in nodes):
                raise SystemExit(f"the swarm did not come up; logs in {workdir}")
            time.sleep(0.5)
        before = psutil.Process().memory_info().rss
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = time.perf_counter()
        info = export_swarm(ExportOptions(peers=(peer,), run_id="bench", out_dir=os.path.join(workdir, "export"),
                                          identity_path=reader, host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
        took = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        swarm.stop()
    result = {"preset": args.preset, "stages": args.stages, "step": info["step"], "param_bytes": param_bytes,
              "rss_before_bytes": before, "peak_rss_bytes": peak, "peak_before_bytes": peak_before,
              "peak_increase_bytes": peak - before, "ratio": round((peak - before) / param_bytes, 3),
              "export_s": round(took, 2)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
