"""WSM checkpoint-merge weights: emulate an LR decay by averaging checkpoints (arXiv 2507.17634).

Train at a constant LR and keep checkpoints theta_n, ..., theta_{n+k} (k + 1 checkpoints, `window`
= k intervals). Writing theta_{n+j} = theta_n + sum_{i<=j} u_i, with u_i the update made between
checkpoints n+i-1 and n+i, a merge with coefficients c_0..c_k (summing to 1) is

    sum_j c_j theta_{n+j} = theta_n + sum_{i=1..k} w_i u_i,   w_i = sum_{j>=i} c_j.

This is exact algebra on the iterates; the "equivalent to LR decay" reading (WSM paper, Ling 2.0
report Eq. 2) additionally assumes the updates do not depend on the LR used earlier. So the merge
scales interval i's update by w_i, i.e. applies the decay w. Conversely a decay curve
1 >= w_1 >= ... >= w_k >= 0 gives the unique non-negative coefficients (report Eq. 3)

    c_k = w_k,  c_j = w_j - w_{j+1} (1 <= j < k),  c_0 = 1 - w_1.

Decay curves (`decay_curve`): w_i = f(i / (k + 1)) with f from `schedule.decay_shape`
(linear 1 - x, cosine (1 + cos(pi x)) / 2, 1-sqrt 1 - sqrt(x)): a decay from 1 to 0 spread over
k + 1 equal intervals, read at the k checkpoint boundaries inside the window. This placement is the
one under which the plain mean of the k + 1 checkpoints is exactly linear decay (w_i = 1 - i/(k+1),
c_j = 1/(k+1)), as the report states, and every checkpoint gets weight > 0. Ling 2.0 averaged its
top-32 checkpoints uniformly ("mean"); the WSM paper found 1-sqrt best and the window length the
most important choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.train.schedule import DECAY_KINDS, decay_shape

MERGE_KINDS = ("mean",) + DECAY_KINDS


def _check_window(window: int) -> int:
    if isinstance(window, bool) or int(window) != window or window < 0:
        raise ValueError(f"window must be a non-negative integer (checkpoints - 1), got {window!r}")
    return int(window)


def decay_curve(kind: str, window: int) -> np.ndarray:
    """w_1..w_k (float64, length `window`): w_i = f(i / (window + 1)); "mean" is linear decay."""
    if kind not in MERGE_KINDS:
        raise ValueError(f"kind must be one of {MERGE_KINDS}, got {kind!r}")
    k = _check_window(window)
    x = np.arange(1, k + 1, dtype=np.float64) / (k + 1)
    return decay_shape("linear" if kind == "mean" else kind, x, xp=np)


def coefficients_from_decay(w: Sequence[float]) -> np.ndarray:
    """c_0..c_k from a decay curve 1 >= w_1 >= ... >= w_k >= 0 (report Eq. 3), oldest first."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or np.any(w > 1) or np.any(np.diff(w) > 0):
        raise ValueError(f"decay curve must satisfy 1 >= w_1 >= ... >= w_k >= 0, got {w.tolist()}")
    padded = np.concatenate([[1.0], w, [0.0]])
    return padded[:-1] - padded[1:]


def decay_from_coefficients(c: Sequence[float]) -> np.ndarray:
    """w_1..w_k with w_i = sum_{j>=i} c_j: the decay a merge with coefficients c_0..c_k emulates."""
    c = np.asarray(c, dtype=np.float64).reshape(-1)
    return np.cumsum(c[::-1])[::-1][1:]


def merge_coefficients(kind: str, window: int) -> np.ndarray:
    """c_0..c_window (oldest checkpoint first), non-negative, summing to 1, for a decay `kind`."""
    return coefficients_from_decay(decay_curve(kind, window))


def merge_pytrees(trees: Sequence[Any], coefficients: Sequence[float]) -> Any:
    """sum_j coefficients[j] * trees[j], leaf by leaf.

    Accumulates in float32 (or the leaf dtype if wider) and casts back to the leaf dtype. All trees
    must share structure, shapes and dtypes, and only floating-point leaves are merged (drop integer
    state such as step counters first). Coefficients must be >= 0 and sum to 1 (within 1e-6).
    """
    coefficients = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if len(trees) != len(coefficients):
        raise ValueError(f"got {len(trees)} trees but {len(coefficients)} coefficients")
    if len(trees) == 0:
        raise ValueError("need at least one tree to merge")
    if not np.all(np.isfinite(coefficients)) or np.any(coefficients < 0):
        raise ValueError(f"coefficients must be finite and >= 0, got {coefficients.tolist()}")
    if abs(coefficients.sum() - 1.0) > 1e-6:
        raise ValueError(f"coefficients must sum to 1, got sum {coefficients.sum()!r}")

    flat = [jax.tree_util.tree_flatten_with_path(tree) for tree in trees]
    ref_leaves, ref_def = flat[0]
    ref_paths = [jax.tree_util.keystr(path) for path, _ in ref_leaves]
    for t, (leaves, treedef) in enumerate(flat[1:], start=1):
        if treedef != ref_def:
            paths = [jax.tree_util.keystr(path) for path, _ in leaves]
            only_ref = sorted(set(ref_paths) - set(paths))
            only_t = sorted(set(paths) - set(ref_paths))
            raise ValueError(
                f"tree {t} has a different structure from tree 0: only in tree 0: {only_ref[:5]}, "
                f"only in tree {t}: {only_t[:5]} (tree 0: {ref_def}; tree {t}: {treedef})"
            )
        for path, (_, ref_leaf), (_, leaf) in zip(ref_paths, ref_leaves, leaves):
            if jnp.shape(leaf) != jnp.shape(ref_leaf):
                raise ValueError(
                    f"leaf {path}: shape {jnp.shape(ref_leaf)} in tree 0 but {jnp.shape(leaf)} in tree {t}"
                )
            if jnp.result_type(leaf) != jnp.result_type(ref_leaf):
                raise ValueError(
                    f"leaf {path}: dtype {jnp.result_type(ref_leaf)} in tree 0 but {jnp.result_type(leaf)} in tree {t}"
                )

    merged = []
    for i, path in enumerate(ref_paths):
        dtype = jnp.result_type(ref_leaves[i][1])
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"leaf {path}: only floating-point leaves can be merged, got dtype {dtype}")
        acc_dtype = jnp.promote_types(dtype, jnp.float32)
        acc = jnp.zeros(jnp.shape(ref_leaves[i][1]), acc_dtype)
        for c, (leaves, _) in zip(coefficients, flat):
            acc = acc + jnp.asarray(c, acc_dtype) * jnp.asarray(leaves[i][1], acc_dtype)
        merged.append(acc.astype(dtype))
    return jax.tree_util.tree_unflatten(ref_def, merged)
