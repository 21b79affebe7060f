"""fastloss benchmark suite: ``python -m bench`` from the repository root (see bench/README.md).

One generic harness (``bench.harness``) and one module per op family. A family module defines
``cases(device, quick) -> list[Case]`` and may define ``notes(device, cases) -> list[str]``
(``cases``: those selected to run) and ``targets(device) -> list[Target]``.
"""

# Op families, in the order they run by default; each is the module bench/<name>.py.
FAMILIES = ("softmax", "stat_topk", "sinkhorn", "bessel", "linear_cross_entropy")
