"""`cfnode experiment`: the CheckFree paper's comparison on real local swarms.

`schedule` draws the seeded failure schedules (pure), `runner` runs one fresh swarm per strategy and failure
level, `report` turns the runs into results.csv / .json / .md and loss_vs_time.png. Method: docs/experiments.md.
"""
