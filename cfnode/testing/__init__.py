"""The in-process protocol harness: real `cfnode.node.Node`s over an in-memory DHT (memdht.py), transport
(memnet.py) and stage-group all-reduce (memaverage.py), on one seeded virtual-time event loop (vloop.py), with
injected faults (faults.py, plan.py), seeded scenarios (scenario.py; groups: groupscenarios.py, groupchecks.py)
and invariants checked after each run (invariants.py, memberstate.py, runner.py). A race found here is a seed:
`CFNODE_HARNESS_SEED=<seed> pytest tests/harness -k scenario_seed -s` replays it. See docs/testing.md.
"""
