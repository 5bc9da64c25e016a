"""Variables as plain arrays: `unbox` removes Flax's logical-partitioning boxes.

`LingModel(cfg).init(...)` (and `init` of any layer) returns each parameter wrapped in
`nn.LogicallyPartitioned`, a box carrying the parameter's logical axis names (the sharding rules in
ling_jax/sharding/ read them). `Module.apply` accepts boxed or plain trees; code that reads arrays
directly (checkpoint export, optimizers, `jax.grad` of a loss over `variables["params"]`, shape
checks) needs the plain arrays. Every public function of ling_jax that takes variables calls `unbox`,
so either form works everywhere.

    variables = LingModel(cfg).init(rng, ids)      # boxed: {"params": {...LogicallyPartitioned...}}
    params = ling_jax.unbox(variables)["params"]    # plain jax.Arrays, same tree structure
"""

from __future__ import annotations

from typing import Any

from flax.core import meta


def unbox(variables: Any) -> Any:
    """`variables` with every Flax metadata box (e.g. `nn.LogicallyPartitioned`) replaced by its value.

    A tree without boxes comes back unchanged (the same leaves), so calling it twice is harmless."""
    return meta.unbox(variables)
