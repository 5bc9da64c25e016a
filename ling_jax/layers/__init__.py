"""Ling 2.0 layers.

Axis glossary, used in variable names (`x_BTD`) and einsum strings throughout ling_jax:

  B  batch                    T  time (query positions)       S  key/value positions (cache slots)
  D  model width (hidden)     H  query heads                  K  key/value heads
  G  query heads per kv head  Dh head dim                     R  rotary dim (head_dim * partial_rotary)
  F  FFN width                E  routed experts               k  experts per token (top-k)
  C  per-expert capacity      N  flattened tokens (B*T)       V  vocabulary
  L  stacked layers

Logical axis names of parameters (mapped to mesh axes by the one table in ling_jax/sharding/rules.py):
  "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "exp", "embed_moe", "mlp_moe",
  "router_exp", "norm", "embed_concat", "layers".
"""
