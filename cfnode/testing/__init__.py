"""The in-process protocol harness: real `cfnode.node.Node`s over an in-memory DHT (memdht.py) and transport
(memnet.py), on one seeded virtual-time event loop (vloop.py), with injected faults (faults.py, plan.py), seeded
scenarios (scenario.py) and invariants checked after each run (invariants.py, runner.py). A race found here is
a seed: `CFNODE_HARNESS_SEED=<seed> pytest tests/harness -k scenario_seed -s` replays it. See docs/testing.md.
"""
