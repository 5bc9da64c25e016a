"""The train / eval batch: one dict of [B, T] arrays, its keys and dtypes defined here once.

Built by ling_jax/data/packing.py (one row per packed window), read by the train and eval steps
(ling_jax/train/step.py) and the training loop, and described abstractly by the planner
(ling_jax/plan/compiled.py) for the ahead-of-time compile.
"""

from __future__ import annotations

import numpy as np

INPUTS = "inputs"  # token ids fed to the model
TARGETS = "targets"  # the next token of each input
SEGMENT_IDS = "segment_ids"  # document of each token within its packed row (0: padding)
POSITIONS = "positions"  # position of each token within its document
LOSS_MASK = "loss_mask"  # 1.0 where the target counts in the loss

BATCH_DTYPES: dict[str, np.dtype] = {
    INPUTS: np.dtype(np.int32),
    TARGETS: np.dtype(np.int32),
    SEGMENT_IDS: np.dtype(np.int32),
    POSITIONS: np.dtype(np.int32),
    LOSS_MASK: np.dtype(np.float32),
}
BATCH_KEYS = tuple(BATCH_DTYPES)
