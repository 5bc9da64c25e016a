"""Ling 2.0 ops: the pure functions the Flax modules of ling_jax/layers/ call.

The code reads top-down: layers (Flax modules) -> ops (functions, custom VJPs, shard_map wrappers) ->
kernels (pallas_kernels/, cpu_kernels/) -> shard_typing. Nothing here imports a layer. Variable names
and einsum strings use the axis glossary of ling_jax/layers/__init__.py.
"""
