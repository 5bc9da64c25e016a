"""`ling-jax params --config configs/ling_1t.py`: total and activated parameter counts."""

from __future__ import annotations

import json

from ling_jax.commands.flags import define_config_flag

_CONFIG = define_config_flag()


def main(argv):
    del argv
    from ling_jax.params import count_params
    from ling_jax.train.config import experiment_from_config

    model = experiment_from_config(_CONFIG.value).model
    c = count_params(model)
    rows = [
        ("total (MTP excluded)", c.total),
        ("total non-embedding", c.total_non_embedding),
        ("activated per token", c.activated),
        ("activated non-embedding", c.activated_non_embedding),
        ("MTP layers total", c.mtp_total),
        ("MTP layers activated", c.mtp_activated),
    ]
    for name, n in rows:
        print(f"{name:<26} {n:>18,d}  ({n / 1e9:.3f} B)")
    print(
        json.dumps(
            {
                "total": c.total,
                "activated": c.activated,
                "total_non_embedding": c.total_non_embedding,
                "activated_non_embedding": c.activated_non_embedding,
                "mtp_total": c.mtp_total,
                "mtp_activated": c.mtp_activated,
            }
        )
    )
