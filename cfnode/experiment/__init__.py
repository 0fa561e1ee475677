"""`cfnode experiment`: the CheckFree paper's comparison on real local swarms.

`schedule` draws the seeded failure schedules (pure; with `--replicas K`, member kills and stage losses),
`runner` runs the experiment (options, failure levels, schedules, one fresh swarm per strategy and failure
level), `swarmrun` one swarm through `cfnode demo` and its record from the nodes' events, `report` turns the
runs into results.csv / .json / .md and loss_vs_time.png. Method: docs/experiments.md.
"""
