"""Planning a training run before it runs: memory and FLOPs per device from the rules table
(analytic), the real train step compiled ahead of time for a TPU topology (compiled), mesh
search, and the scaling-law view of the budget. Entry point: `ling-jax plan` (ling_jax/commands/plan.py).

  topology.py       TPU generations (HBM, peak FLOP/s), topology names, libtpu device lists
  analytic.py       per-device bytes of every TrainState leaf from the logical rules
  activations.py    first-order activation memory per device
  program_flops.py  matmul FLOPs of a traced program (scan trip counts applied)
  compiled.py       AOT lower + compile of the train step: memory_analysis, cost_analysis
  search.py         mesh factorizations ranked analytically
  budget.py         EL, optimal LR and batch for the planned compute
  report.py         text / JSON rendering
"""
