"""Decoding: KV-cache generation (`generate`) and next-token sampling (`sample_logits`)."""

from ling_jax.decoding.generate import GenerateOutput, generate, init_cache
from ling_jax.decoding.sampling import sample_logits, validate_sampling

__all__ = ["GenerateOutput", "generate", "init_cache", "sample_logits", "validate_sampling"]
