"""SFT data: conversations rendered with the Ling chat format, packed whole into training rows.

Packing. Rows hold C = seq_len + 1 tokens (inputs row[:-1], targets row[1:], as PackedRows). The
rendered conversations are placed in order, each whole in the first row where it still fits after
the previous one (a conversation is never split across rows: its later tokens would lose the
context they depend on); the rest of a row is padding (`pad_id`, segment 0). A conversation longer
than C tokens is an error naming it. Per row: `segment_ids` 1, 2, ... per conversation (0 for
padding), `positions` restart at 0 at each conversation, and `loss_mask` is 1.0 exactly where the
target token was written by the assistant (chat.py's assistant mask) within the same conversation:
the loss covers assistant tokens only.

`ChatRows` is a random-access source like PackedRows (`len`, `batch(indices)`, `seq_len`,
`pad_id`, `tokens_L`), so the Grain train iterator, the eval batches and the training loop take it
unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ling_jax.data import batch as batch_keys
from ling_jax.data import chat
from ling_jax.data.corpus import split_documents
from ling_jax.data.pipeline import Datasets
from ling_jax.data.tokenizer import Tokenizer, check_token_ids, load_tokenizer
from ling_jax.posttrain.config import TASK_SOURCE, SFTConfig
from ling_jax.tasks import arithmetic


@dataclasses.dataclass(frozen=True, eq=False)
class ChatRows:
    """Packed conversations: [R, C] tokens, segment ids, positions and assistant mask (C = seq_len + 1)."""

    tokens_RC: np.ndarray
    segments_RC: np.ndarray
    positions_RC: np.ndarray
    assistant_RC: np.ndarray
    pad_id: int
    num_conversations: int

    @property
    def seq_len(self) -> int:
        return self.tokens_RC.shape[1] - 1

    @property
    def tokens_L(self) -> np.ndarray:
        """Every real token, in order (the loop's unigram-entropy reference reads it)."""
        return self.tokens_RC[self.segments_RC != 0]

    @property
    def assistant_tokens(self) -> int:
        return int(self.assistant_RC.sum())

    def __len__(self) -> int:
        return self.tokens_RC.shape[0]

    def batch(self, indices) -> dict[str, np.ndarray]:
        """Rows at `indices` ([N] ints in [0, len)) as the batch dict of [N, seq_len] arrays."""
        idx_N = np.asarray(indices, dtype=np.int64)
        tokens_NC, seg_NC = self.tokens_RC[idx_N], self.segments_RC[idx_N]
        same_NT = (seg_NC[:, 1:] == seg_NC[:, :-1]) & (seg_NC[:, 1:] != 0)
        return {
            batch_keys.INPUTS: tokens_NC[:, :-1],
            batch_keys.TARGETS: tokens_NC[:, 1:],
            batch_keys.SEGMENT_IDS: seg_NC[:, :-1],
            batch_keys.POSITIONS: self.positions_RC[idx_N][:, :-1],
            batch_keys.LOSS_MASK: (self.assistant_RC[idx_N][:, 1:] & same_NT).astype(np.float32),
        }


def pack_chats(
    rendered: Sequence[chat.RenderedChat], seq_len: int, pad_id: int, names: Sequence[str] | None = None
) -> ChatRows:
    """Packs rendered conversations whole into rows of seq_len + 1 tokens (module docstring).
    `names[i]` names conversation i in errors (default "conversation i")."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not rendered:
        raise ValueError("no conversations to pack")
    C = seq_len + 1
    starts: list[tuple[int, int]] = []  # (row, offset) of each conversation
    row, used = 0, 0
    for i, r in enumerate(rendered):
        n = len(r.ids_L)
        if n > C:
            name = names[i] if names is not None else f"conversation {i}"
            raise ValueError(
                f"{name} renders to {n} tokens, more than a training row holds (train.seq_len + 1 = {C}); "
                "raise train.seq_len or shorten it"
            )
        if used + n > C:
            row, used = row + 1, 0
        starts.append((row, used))
        used += n
    R = row + 1
    tokens = np.full((R, C), pad_id, np.int32)
    segments = np.zeros((R, C), np.int32)
    positions = np.zeros((R, C), np.int32)
    assistant = np.zeros((R, C), bool)
    segment = 0
    for (r_, off), r in zip(starts, rendered):
        segment = 1 if off == 0 else segment + 1
        n = len(r.ids_L)
        tokens[r_, off : off + n] = r.ids_L
        segments[r_, off : off + n] = segment
        positions[r_, off : off + n] = np.arange(n)
        assistant[r_, off : off + n] = r.assistant_mask_L
    return ChatRows(tokens, segments, positions, assistant, int(pad_id), len(rendered))


def task_conversations(
    problems: Sequence[arithmetic.Problem], think_fraction: float, seed: int, verbose_fraction: float = 0.0
) -> list[list[dict]]:
    """One SFT conversation per problem: think-on (with the program's trace) for a seeded
    `think_fraction` of them, think-off (the answer alone) for the rest; a seeded `verbose_fraction`
    of the think-on traces end with the filler sentence (arithmetic.sft_trace)."""
    rng = np.random.default_rng([seed, 1])
    think_N = rng.random(len(problems)) < think_fraction
    verbose_N = rng.random(len(problems)) < verbose_fraction
    return [
        chat.conversation(p.prompt, arithmetic.sft_trace(p, think=bool(t), verbose=bool(t and r)), think=bool(t))
        for p, t, r in zip(problems, think_N, verbose_N)
    ]


def _pad_id(tokenizer: Tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return int(tokenizer.eos_id if pad is None else pad)


def _render_all(conversations, tokenizer, names) -> list[chat.RenderedChat]:
    rendered = [chat.render(c, tokenizer, where=n) for c, n in zip(conversations, names)]
    for r, n in zip(rendered, names):
        check_token_ids(r.ids_L, tokenizer.vocab_size, what=f"tokenizer output for {n}")
    return rendered


def build_sft_datasets(
    source: str, tokenizer_spec: str, seq_len: int, seed: int, heldout_fraction: float, sft: SFTConfig
) -> Datasets:
    """Train and held-out rows of the SFT data (`source`: TASK_SOURCE or a chat JSONL file).

    Task: `sft.train_problems` train-split problems and `sft.heldout_loss_problems` held-out-split
    ones (never the same problems). JSONL: a seeded `heldout_fraction` of the conversations is held
    out (none when 0)."""
    tokenizer = load_tokenizer(tokenizer_spec)
    pad = _pad_id(tokenizer)
    if source == TASK_SOURCE:
        task_cfg = sft.task_config()
        train_c = task_conversations(
            arithmetic.make_split("train", sft.train_problems, seed, task_cfg),
            sft.think_fraction,
            seed,
            sft.verbose_fraction,
        )
        held_c = task_conversations(
            arithmetic.make_split("heldout", sft.heldout_loss_problems, seed, task_cfg),
            sft.think_fraction,
            seed + 1,
            sft.verbose_fraction,
        )
        train_names = [f"task problem {i}" for i in range(len(train_c))]
        held_names = [f"held-out task problem {i}" for i in range(len(held_c))]
    else:
        conversations = chat.read_jsonl(source)
        numbered = [(f"{source} conversation {i + 1}", c) for i, c in enumerate(conversations)]
        train_n, held_n = split_documents(numbered, heldout_fraction, seed) if heldout_fraction else (numbered, [])
        train_names, train_c = [n for n, _ in train_n], [c for _, c in train_n]
        held_names, held_c = [n for n, _ in held_n], [c for _, c in held_n]
    train = pack_chats(_render_all(train_c, tokenizer, train_names), seq_len, pad, train_names)
    heldout = pack_chats(_render_all(held_c, tokenizer, held_names), seq_len, pad, held_names) if held_c else None
    return Datasets(train=train, heldout=heldout, tokenizer=tokenizer)
