"""Compiled CPU kernels for ling_jax (XLA FFI targets built by setup.py), each beside a pure-JAX path
that computes the same thing and serves where the kernel is not built.

- moe_experts: the routed SwiGLU experts of a MoE layer, forward and backward (`moe_experts`);
  reference: the "dense" dispatch of ling_jax/ops/dispatch.py.

`pip install` (editable too) compiles the sources; after editing a .cc file, run `pip install -e .`
again to rebuild.
"""
