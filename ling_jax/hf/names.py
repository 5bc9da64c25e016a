"""The one table between HF BailingMoeV2 tensor names and ling_jax variables.

Each `Entry` ties one HF tensor per stack index to one or more ling_jax leaves:
  - `leaves`: (collection, path) of each ling_jax leaf it feeds (q/k/v come from one fused HF tensor);
  - `hf_names`: the HF tensor names in row-major order over `stack` (layers, then experts);
  - `to_ours(hf) -> tuple of slices`, `to_hf(slices) -> hf`: exact (transposes, reshapes, splits).
HF Linear weights are [out, in]; ling_jax kernels are [in, out] (heads split out where it helps sharding).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from ling_jax.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    leaves: tuple[tuple[str, Path], ...]
    hf_names: tuple[str, ...]
    stack: tuple[int, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[[tuple[np.ndarray, ...]], np.ndarray]
    slice_shapes: tuple[tuple[int, ...], ...]  # shape of each leaf's slice (one HF tensor's share)
    hf_shape: tuple[int, ...]


def _linear(in_dim, out_shape):
    """HF [out, in] <-> ours [in, *out_shape]."""
    out = int(np.prod(out_shape))
    return (
        lambda w: (w.T.reshape(in_dim, *out_shape),),
        lambda s: s[0].reshape(in_dim, out).T,
        ((in_dim, *out_shape),),
        (out, in_dim),
    )


def _linear_in(in_shape, out_dim):
    """HF [out, in] <-> ours [*in_shape, out] (output projections with a split input)."""
    n_in = int(np.prod(in_shape))
    return (
        lambda w: (w.T.reshape(*in_shape, out_dim),),
        lambda s: s[0].reshape(n_in, out_dim).T,
        ((*in_shape, out_dim),),
        (out_dim, n_in),
    )


def _vector(n):
    return (lambda w: (w,), lambda s: s[0], ((n,),), (n,))


def _qkv_weight(cfg: ModelConfig):
    H, K, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    cuts = [H * Dh, (H + K) * Dh]

    def to_ours(w):
        q, k, v = np.split(w, cuts, axis=0)
        return q.T.reshape(D, H, Dh), k.T.reshape(D, K, Dh), v.T.reshape(D, K, Dh)

    def to_hf(s):
        return np.concatenate([x.reshape(D, -1).T for x in s], axis=0)

    return to_ours, to_hf, ((D, H, Dh), (D, K, Dh), (D, K, Dh)), ((H + 2 * K) * Dh, D)


def _qkv_bias(cfg: ModelConfig):
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cuts = [H * Dh, (H + K) * Dh]

    def to_ours(b):
        q, k, v = np.split(b, cuts)
        return q.reshape(H, Dh), k.reshape(K, Dh), v.reshape(K, Dh)

    return (
        to_ours,
        lambda s: np.concatenate([x.reshape(-1) for x in s]),
        ((H, Dh), (K, Dh), (K, Dh)),
        ((H + 2 * K) * Dh,),
    )


def _layer_spec(cfg: ModelConfig, is_moe: bool):
    """(our sub-leaves (collection, path), HF suffix, converter, per-expert?) for one decoder layer."""
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    P = "params"
    spec = [
        (((P, ("input_norm", "scale")),), "input_layernorm.weight", _vector(D), False),
        (((P, ("post_attention_norm", "scale")),), "post_attention_layernorm.weight", _vector(D), False),
        (
            tuple((P, ("attention", f"{n}_proj", "kernel")) for n in "qkv"),
            "attention.query_key_value.weight",
            _qkv_weight(cfg),
            False,
        ),
        (((P, ("attention", "o_proj", "kernel")),), "attention.dense.weight", _linear_in((H, Dh), D), False),
    ]
    if cfg.use_qkv_bias:
        spec.append(
            (
                tuple((P, ("attention", f"{n}_bias")) for n in "qkv"),
                "attention.query_key_value.bias",
                _qkv_bias(cfg),
                False,
            )
        )
    if cfg.use_qk_norm:
        spec.append(
            (((P, ("attention", "query_norm", "scale")),), "attention.query_layernorm.weight", _vector(Dh), False)
        )
        spec.append((((P, ("attention", "key_norm", "scale")),), "attention.key_layernorm.weight", _vector(Dh), False))
    if cfg.use_bias:
        spec.append((((P, ("attention", "o_bias")),), "attention.dense.bias", _vector(D), False))
    if not is_moe:
        F = cfg.intermediate_size
        for name in ("gate_proj", "up_proj"):
            spec.append((((P, ("mlp", name, "kernel")),), f"mlp.{name}.weight", _linear(D, (F,)), False))
        spec.append((((P, ("mlp", "down_proj", "kernel")),), "mlp.down_proj.weight", _linear(F, (D,)), False))
        return spec
    F, E = cfg.moe_intermediate_size, cfg.num_experts
    spec.append((((P, ("moe", "router")),), "mlp.gate.weight", _linear(D, (E,)), False))
    spec.append(((("expert_bias", ("moe", "bias")),), "mlp.gate.expert_bias", _vector(E), False))
    for name in ("gate_proj", "up_proj"):
        spec.append((((P, ("moe", name)),), f"mlp.experts.{{e}}.{name}.weight", _linear(D, (F,)), True))
    spec.append((((P, ("moe", "down_proj")),), "mlp.experts.{e}.down_proj.weight", _linear(F, (D,)), True))
    if cfg.num_shared_experts:
        Fs = cfg.shared_intermediate_size
        for name in ("gate_proj", "up_proj"):
            spec.append(
                (
                    ((P, ("moe", "shared_experts", name, "kernel")),),
                    f"mlp.shared_experts.{name}.weight",
                    _linear(D, (Fs,)),
                    False,
                )
            )
        spec.append(
            (
                ((P, ("moe", "shared_experts", "down_proj", "kernel")),),
                "mlp.shared_experts.down_proj.weight",
                _linear(Fs, (D,)),
                False,
            )
        )
    return spec


def _layer_entries(spec, layer_ids, prefix: Path, layer_axis: bool, num_experts: int) -> list[Entry]:
    """Entries of a group of HF layers feeding leaves under `prefix`, stacked on a leading layer
    axis when `layer_axis` (scanned stacks), else a single layer."""
    entries = []
    for leaves, suffix, (to_ours, to_hf, slice_shapes, hf_shape), per_expert in spec:
        experts = range(num_experts) if per_expert else [None]
        names = tuple(
            f"model.layers.{layer}.{suffix.format(e=e)}" for layer, e in itertools.product(layer_ids, experts)
        )
        stack = ((len(layer_ids),) if layer_axis else ()) + ((num_experts,) if per_expert else ())
        entries.append(
            Entry(tuple((c, prefix + p) for c, p in leaves), names, stack, to_ours, to_hf, slice_shapes, hf_shape)
        )
    return entries


def _stack_entries(cfg: ModelConfig, is_moe: bool, layer_ids: range, name: str) -> list[Entry]:
    spec = _layer_spec(cfg, is_moe)
    if cfg.scan_layers:
        return _layer_entries(spec, layer_ids, (name, "layers"), True, cfg.num_experts)
    return [
        e
        for i, layer in enumerate(layer_ids)
        for e in _layer_entries(spec, [layer], (name, f"layers_{i}"), False, cfg.num_experts)
    ]


def checkpoint_entries(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of a checkpoint of `cfg`, mapped onto the ling_jax variable tree."""
    D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_experts
    P = "params"

    def top(path, name, conv):
        to_ours, to_hf, slice_shapes, hf_shape = conv
        return Entry(((P, path),), (name,), (), to_ours, to_hf, slice_shapes, hf_shape)

    entries = [
        top(("embedding",), "model.word_embeddings.weight", (lambda w: (w,), lambda s: s[0], ((V, D),), (V, D))),
        top(("final_norm", "scale"), "model.norm.weight", _vector(D)),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(top(("lm_head",), "lm_head.weight", _linear(D, (V,))))
    n_dense = cfg.num_dense_layers
    if n_dense:
        entries += _stack_entries(cfg, False, range(n_dense), "dense_stack")
    if cfg.num_moe_layers:
        entries += _stack_entries(cfg, True, range(n_dense, cfg.num_layers), "moe_stack")
    for i in range(cfg.num_mtp_layers):
        layer = cfg.num_layers + i
        pre = (f"mtp_{i}",)
        entries += [
            top(pre + ("enorm", "scale"), f"model.layers.{layer}.enorm.weight", _vector(D)),
            top(pre + ("hnorm", "scale"), f"model.layers.{layer}.hnorm.weight", _vector(D)),
            top(pre + ("eh_proj", "kernel"), f"model.layers.{layer}.eh_proj.weight", _linear(2 * D, (D,))),
            top(pre + ("final_norm", "scale"), f"model.layers.{layer}.final_layernorm.weight", _vector(D)),
        ]
        entries += _layer_entries(_layer_spec(cfg, True), [layer], pre + ("layer",), False, E)
    return entries
