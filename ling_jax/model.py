"""LingModel: the Ling 2.0 (BailingMoeV2) causal LM as a pure-functional Linen module.

    out = LingModel(cfg).apply(variables, input_ids_BT)           # variables: params + expert_bias
    out.logits [B, T, V], out.mtp_logits [M, B, T, V], out.router.counts_E [L_moe, E]

Token ids: `apply` stays trace-friendly, so it does not look at id values (an id >= vocab_size gives
NaN logits, a negative one wraps). Checked paths: `apply_checked(cfg, variables, ids)` checks
concrete ids on the host first; inside jit, `LingModel(cfg, checked=True)` under `checkify.checkify`.
The training data pipeline and `generate` always check. More tokens than max_position_embeddings
is a ValueError at trace time.

The dense prefix and the MoE layers are two `nn.scan` stacks. Packed sequences pass
`segment_ids` (0 = padding) and per-document `positions`; attention never crosses segments.
Decoding passes a fixed-size `DecodeCache` (see ling_jax/decoding/generate.py).

With `fp8` on, the output head (lm_head, shared by the MTP layers) is a blockwise FP8 matmul too:
ling2-spec.md's FP8 line keeps only the router, expert bias and attention softmax in high precision
(DeepSeek-V3, whose recipe Ling 2.0 follows, also keeps the output head in BF16; the spec does not).
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ling_jax.config import ModelConfig
from ling_jax.layers.attention import KVCache, attention_mask, write_slots
from ling_jax.layers.basic import RMSNorm, param_with_axes
from ling_jax.layers.decoder import ACTIVATION_AXES, MTPLayer, mtp_name
from ling_jax.layers.moe import RouterStats
from ling_jax.layers.stack import LayerStack, stack_name
from ling_jax.ops.fp8 import FP8_STATS, fp8_impl, fp8_projection, quantization_stats
from ling_jax.ops.rope import rope_cos_sin


class DecodeCache(NamedTuple):
    """KV caches of the dense and MoE stacks ([L, B, S, K, Dh] each), the segment id of every slot
    [B, S] (0 = empty or padding) and the next slot to write: an int32 scalar, or [B] when rows
    advance separately (speculative decoding). `mtp` is MTP layer 0's cache [B, S, K, Dh], used by
    the draft call (`mtp_hidden_BTD`); a draft cache holds only it (dense = moe = None)."""

    dense: KVCache | None
    moe: KVCache | None
    segment_ids_BS: jax.Array
    index: jax.Array
    mtp: KVCache | None = None


@flax.struct.dataclass
class LingOutput:
    logits: jax.Array  # [B, T, V] float32
    mtp_logits: jax.Array | None  # [M, B, T, V] float32; MTP layer i predicts token t + i + 2
    hidden_states: jax.Array  # [1 + L, B, T, D]: embeddings, then each main layer's output
    final_hidden: jax.Array  # [B, T, D] after the final norm (lm_head input)
    mtp_hidden: jax.Array | None  # [M, B, T, D] after each MTP layer's final norm
    router: RouterStats | None  # main-stack MoE layers, stacked: counts_E [L_moe, E], ...
    mtp_router: RouterStats | None  # MTP layers, stacked: counts_E [M, E], ...
    cache: DecodeCache | None


def _concat_stats(a, b):
    if a is None or b is None:
        return a if b is None else b
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


class LingModel(nn.Module):
    config: ModelConfig
    checked: bool = False  # add checkify checks (token ids in range); run under checkify.checkify

    @nn.compact
    def __call__(
        self,
        input_ids_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: DecodeCache | None = None,
        with_mtp: bool = True,
        mtp_hidden_BTD: jax.Array | None = None,
    ) -> LingOutput:
        """The forward. With a `cache`, decoding: the main stack reads and extends the cache. With a
        cache and `mtp_hidden_BTD` (a draft step of speculative decoding), only MTP layer 0 runs, on
        embed(input_ids) and those hidden states (the main model's final hidden, or MTP layer 0's own
        output when drafting recurrently), with `cache.mtp`; logits and final_hidden are then the MTP
        layer's (predicting the token after input_ids), mtp_logits / mtp_hidden are None."""
        cfg = self.config
        drafting = mtp_hidden_BTD is not None
        if drafting and (cache is None or cache.mtp is None or not cfg.num_mtp_layers):
            raise ValueError("an MTP draft step needs num_mtp_layers >= 1 and a DecodeCache with an mtp cache")
        B, T = input_ids_BT.shape
        # Shapes are static: plain Python checks, at trace time.
        if not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids_BT.dtype}")
        slots = T if cache is None else cache.segment_ids_BS.shape[1]
        if max(T, slots) > cfg.max_position_embeddings:
            what = f"{T} tokens" if cache is None else f"a decode cache of {slots} slots"
            raise ValueError(f"input of {what} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        if self.checked:
            ids = input_ids_BT
            checkify.check(
                jnp.all((ids >= 0) & (ids < cfg.vocab_size)),
                # Formatting arguments must be arrays (a Python int raises TypeError at trace time).
                f"input_ids out of range [0, {cfg.vocab_size}): min id {{lo}}, max id {{hi}}",
                lo=ids.min(),
                hi=ids.max(),
            )
        start = jnp.int32(0) if cache is None else cache.index
        index_BT = jnp.broadcast_to(jnp.reshape(start, (-1, 1)) + jnp.arange(T, dtype=jnp.int32), (B, T))
        if positions_BT is None:
            positions_BT = index_BT
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        token_mask_BT = segment_ids_BT != 0

        embedding_VD = param_with_axes(
            self,
            "embedding",
            nn.initializers.normal(cfg.init_std),
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"),
            cfg.jnp_param_dtype,
        )

        def embed(ids_BT):
            # Pinned to the batch sharding: left to GSPMD, the gather's output followed the table's
            # sharding, and on an expert-parallel mesh (fsdp=64 expert=8 model=8) the MTP layer's lookup
            # was all-gathered to the global [B, T, D] batch (64 GiB per chip at Ling-1T's batch 512 x 4K).
            emb_BTD = jnp.take(embedding_VD, ids_BT, axis=0).astype(cfg.jnp_dtype)
            return nn.with_logical_constraint(emb_BTD, ACTIVATION_AXES)

        emb_BTD = embed(input_ids_BT)
        cos_BTR, sin_BTR = rope_cos_sin(positions_BT, cfg)

        if cache is None:
            mask_BTS = attention_mask(segment_ids_BT, segment_ids_BT, index_BT, index_BT)
            new_segments_BS = None
        else:
            new_segments_BS = write_slots(cache.segment_ids_BS, segment_ids_BT, cache.index)
            S = new_segments_BS.shape[1]
            slots_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
            mask_BTS = attention_mask(segment_ids_BT, new_segments_BS, index_BT, slots_BS)

        x_BTD = emb_BTD
        hidden, router, caches = [emb_BTD[None]], None, {}
        common = (cos_BTR, sin_BTR, mask_BTS, token_mask_BT, None if cache is None else cache.index)
        for name, is_moe, n in (("dense", False, cfg.num_dense_layers), ("moe", True, cfg.num_moe_layers)):
            if n == 0 or drafting:
                caches[name] = None
                continue
            layer_cache = None if cache is None else getattr(cache, name)
            x_BTD, (h_LBTD, stats, caches[name]) = LayerStack(cfg, is_moe, n, name=stack_name(name))(
                x_BTD, *common, layer_cache
            )
            hidden.append(h_LBTD)
            router = _concat_stats(router, stats)

        final_norm = RMSNorm(cfg.rms_norm_eps, "norm", cfg.jnp_param_dtype, name="final_norm")
        final_BTD = x_BTD if drafting else final_norm(x_BTD)  # drafting: replaced by the MTP layer's output
        if cfg.tie_word_embeddings:
            lm_head_DV = embedding_VD.T
        else:
            lm_head_DV = param_with_axes(
                self,
                "lm_head",
                nn.initializers.normal(cfg.init_std),
                (cfg.hidden_size, cfg.vocab_size),
                ("embed", "vocab"),
                cfg.jnp_param_dtype,
            )

        def logits(h_BTD):
            if fp8_impl(cfg.fp8) is not None:  # float32 logits from the blockwise FP8 matmul (forward and backward)
                return fp8_projection(
                    h_BTD, lm_head_DV.astype(cfg.jnp_dtype), contract=1, impl=fp8_impl(cfg.fp8), out_dtype=jnp.float32
                )
            return jnp.einsum(
                "BTD,DV->BTV", h_BTD, lm_head_DV.astype(cfg.jnp_dtype), preferred_element_type=jnp.float32
            )

        if fp8_impl(cfg.fp8) is not None:  # the head's quantization statistics, as every FP8 projection sows its own
            for prefix, value, blocks in (
                ("input", final_BTD.reshape(-1, cfg.hidden_size), False),
                ("kernel", lm_head_DV, True),
            ):
                for name, stat in quantization_stats(value, blocks=blocks).items():
                    self.sow(FP8_STATS, f"lm_head_{prefix}_{name}", stat)

        mtp_logits = mtp_hidden = mtp_router = None
        new_mtp_cache = None if cache is None else cache.mtp
        if drafting:
            final_BTD, router, new_mtp_cache = MTPLayer(cfg, name=mtp_name(0))(
                emb_BTD, mtp_hidden_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT, cache.index, cache.mtp
            )
        elif cfg.num_mtp_layers and with_mtp and cache is None:
            ids_BT, h_BTD, outs = input_ids_BT, final_BTD, []
            for i in range(cfg.num_mtp_layers):
                # As the reference: ids shifted left by one more per MTP layer, vacated slots get id 0.
                ids_BT = jnp.concatenate([ids_BT[:, 1:], jnp.zeros((B, 1), ids_BT.dtype)], axis=1)
                h_BTD, stats, _ = MTPLayer(cfg, name=mtp_name(i))(
                    embed(ids_BT), h_BTD, cos_BTR, sin_BTR, mask_BTS, token_mask_BT
                )
                outs.append((h_BTD, stats))
            mtp_hidden = jnp.stack([h for h, _ in outs])
            # Off: one einsum per MTP layer. FP8: one matmul over all rows (tiles are per row anyway).
            mtp_logits = jax.vmap(logits)(mtp_hidden) if fp8_impl(cfg.fp8) is None else logits(mtp_hidden)
            mtp_router = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in outs])

        new_cache = None
        if cache is not None:
            new_cache = DecodeCache(caches["dense"], caches["moe"], new_segments_BS, cache.index + T, new_mtp_cache)
        return LingOutput(
            logits=logits(final_BTD),
            mtp_logits=mtp_logits,
            hidden_states=jnp.concatenate(hidden),
            final_hidden=final_BTD,
            mtp_hidden=mtp_hidden,
            router=router,
            mtp_router=mtp_router,
            cache=new_cache,
        )


def init_ids(batch_size: int = 1, seq_len: int = 8) -> jax.Array:
    """The dummy token ids [B, T] `LingModel.init` runs on (variable shapes do not depend on them)."""
    return jnp.zeros((batch_size, seq_len), jnp.int32)


def apply_checked(config: ModelConfig, variables, input_ids_BT, *args, **kwargs) -> LingOutput:
    """`LingModel(config).apply(variables, input_ids_BT, ...)` after checking on the host that every
    id is an integer in [0, vocab_size) (ValueError naming the first bad id and its position).

    For concrete ids; under jit use `LingModel(config, checked=True)` inside `checkify.checkify`."""
    from ling_jax.data.tokenizer import check_token_ids  # the data package imports grain: only when used

    try:
        ids = np.asarray(input_ids_BT)
    except jax.errors.TracerArrayConversionError:
        raise TypeError(
            "apply_checked checks token ids on the host and cannot see traced ids; inside jit use "
            "LingModel(config, checked=True) under checkify.checkify"
        ) from None
    check_token_ids(ids, config.vocab_size, what="input_ids")
    return LingModel(config).apply(variables, input_ids_BT, *args, **kwargs)


def init_variables(config: ModelConfig, rng: jax.Array, batch_size: int = 1, seq_len: int = 8):
    """Initialised variables ({"params", "expert_bias"}) as plain arrays (logical-axis boxes removed)."""
    return nn.unbox(LingModel(config).init(rng, init_ids(batch_size, seq_len)))


def logical_axes(config: ModelConfig, batch_size: int = 1, seq_len: int = 8):
    """The logical axis names of every variable, as a pytree of PartitionSpecs (no allocation)."""
    boxed = jax.eval_shape(lambda: LingModel(config).init(jax.random.key(0), init_ids(batch_size, seq_len)))
    return nn.get_partition_spec(boxed)
