"""The batch ramp (`train.batch_ramp`): the global batch grows from `start` sequences to the peak
`train.batch_size` linearly in tokens seen over the first `tokens` tokens (Ling 2.0: from 3,024 over
roughly 500B tokens, ../shared/docs/ling2-spec.md).

It grows in whole microbatches: the microbatch shape [batch_size / microbatches, seq_len] never
changes, only how many microbatches a step scans (ling_jax/train/step.py), so jit compiles the step
once per distinct microbatch count. At a step that starts with t tokens seen, the batch is
m(t) microbatches of b rows, m(t) = clamp(floor(target(t) / b), m0, microbatches) with
target(t) = start + (peak - start) * min(1, t / tokens) and m0 = ceil(start / b) (the start rounded
up to whole microbatches). The schedule is a pure function of the step, so a resumed run continues
exactly: the data iterator yields microbatches, and a step draws m(step) of them.
"""

from __future__ import annotations

import bisect
import math

from ling_jax.train.config import TrainConfig


class BatchSchedule:
    """Microbatches per step under `train.batch_ramp` (constant `train.microbatches` without one)."""

    def __init__(self, train: TrainConfig):
        self.microbatch_size = train.microbatch_size
        self.peak = train.microbatches
        self.seq_len = train.seq_len
        ramp = train.batch_ramp
        self._first_steps: list[int] = [0]  # segment i starts at this step ...
        self._counts: list[int] = [self.peak]  # ... and runs this many microbatches per step
        self._tokens: list[int] = [0]  # tokens seen before the segment's first step
        if not ramp.enabled:
            return
        b, T = self.microbatch_size, self.seq_len
        start, peak_rows = ramp.start, train.batch_size
        m = min(max(1, math.ceil(start / b)), self.peak)
        self._counts[0] = m
        step, tokens = 0, 0
        while m < self.peak:
            # the first token count at which the target reaches the next whole microbatch
            threshold = ((m + 1) * b - start) * ramp.tokens / (peak_rows - start)
            steps = max(1, math.ceil((threshold - tokens) / (m * b * T)))
            step, tokens = step + steps, tokens + steps * m * b * T
            target = start + (peak_rows - start) * min(1.0, tokens / ramp.tokens)
            m = min(max(m + 1, math.floor(target / b)), self.peak)
            self._first_steps.append(step)
            self._counts.append(m)
            self._tokens.append(tokens)

    def microbatches(self, step: int) -> int:
        """Microbatches in the batch of `step` (0-based)."""
        return self._counts[bisect.bisect_right(self._first_steps, step) - 1]

    def batch_size(self, step: int) -> int:
        """Sequences in the batch of `step`."""
        return self.microbatches(step) * self.microbatch_size

    def tokens_before(self, step: int) -> int:
        """Tokens trained on before `step`."""
        i = bisect.bisect_right(self._first_steps, step) - 1
        return self._tokens[i] + (step - self._first_steps[i]) * self._counts[i] * self.microbatch_size * self.seq_len

    def segments(self) -> list[tuple[int, int]]:
        """(first step, microbatches) of every stretch of steps with one batch size."""
        return list(zip(self._first_steps, self._counts))
