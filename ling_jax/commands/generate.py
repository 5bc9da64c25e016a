"""`ling-jax generate --workdir RUN | --hf DIR [--prompt TEXT | --prompt-file F] [--max-new-tokens N]
[--temperature T] [--top-p P] [--speculative mtp --draft-tokens k]`: text from a model, streamed.

--workdir: the newest checkpoint of a run that restores and verifies (a damaged newest one is
skipped with a note on stderr), tokenized with the run's tokenizer (data.tokenizer). --hf: a Hugging
Face checkpoint directory (ling_jax.hf.load_checkpoint), tokenized with its tokenizer.json
(--tokenizer overrides). The default prompt is the run's train.sample_prompt ("def " for the README
run), so `ling-jax generate --workdir runs/tiny` samples the README main command's run.

Streaming: the compiled decode loop calls a host callback after every step (plain: one token;
speculative: the accepted tokens of one verify step), which prints the newly decoded text and
flushes stdout. One line of statistics ends the output (stderr is left for errors):
decode tokens/s (first streamed token to the last, so compilation and the prefill are excluded),
and for --speculative the acceptance rate (accepted drafts / drafted tokens) and tokens per verify
step (main-model forward).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by `ling-jax train` (or merge)")
_HF = flags.DEFINE_string("hf", None, "a Hugging Face checkpoint directory (config.json + safetensors)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer spec ('byte' or a tokenizer.json path / directory)")
_PROMPT = flags.DEFINE_string("prompt", None, "prompt text (default: the run's train.sample_prompt)")
_PROMPT_FILE = flags.DEFINE_string("prompt-file", None, "read the prompt from this UTF-8 file")
_MAX_NEW = flags.DEFINE_integer("max-new-tokens", 64, "tokens to generate", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top-k", 0, "sampling: keep the k most likely tokens (0: all)", lower_bound=0)
_TOP_P = flags.DEFINE_float("top-p", 1.0, "sampling: nucleus mass in (0, 1]")
_SPECULATIVE = flags.DEFINE_enum("speculative", None, ["mtp"], "mtp: MTP self-speculative decoding")
_DRAFT = flags.DEFINE_integer("draft-tokens", 2, "--speculative: tokens drafted per verify step", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")


def _usage_error(message: str):
    from ling_jax.cli import USAGE_EXIT

    print(f"ling-jax generate: bad flag: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def load_run(workdir: str):
    """(model config, variables, tokenizer spec, default prompt) of the newest good checkpoint."""
    import jax

    from ling_jax.train.checkpointing import CheckpointError
    from ling_jax.train.run_dir import checkpointer_for, load_experiment, restore

    exp = load_experiment(Path(workdir))
    checkpointer = checkpointer_for(Path(workdir), exp)
    steps = checkpointer.all_steps()
    checkpointer.close()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {workdir}")
    for step in reversed(steps):
        try:
            state, _, step, _, _ = restore(Path(workdir), exp, step)
            break
        except CheckpointError as e:
            print(f"ling-jax generate: skipping checkpoint {step}: {str(e).splitlines()[0]}", file=sys.stderr)
    else:
        raise FileNotFoundError(f"no checkpoint of {workdir} restores ({len(steps)} tried)")
    variables = jax.device_get({"params": state.params, "expert_bias": state.expert_bias})
    return exp.model, variables, exp.data.tokenizer, exp.train.sample_prompt


def main(argv):
    del argv
    if (_WORKDIR.value is None) == (_HF.value is None):
        _usage_error("give exactly one of --workdir RUN or --hf DIR")
    if _PROMPT.value is not None and _PROMPT_FILE.value is not None:
        _usage_error("give --prompt or --prompt-file, not both")
    if not 0.0 < _TOP_P.value <= 1.0:
        _usage_error(f"--top-p must be in (0, 1], got {_TOP_P.value}")
    from ling_jax.data.tokenizer import load_tokenizer
    from ling_jax.decoding import generate

    if _WORKDIR.value is not None:
        cfg, variables, tokenizer_spec, prompt = load_run(_WORKDIR.value)
    else:
        from ling_jax.hf import load_checkpoint

        cfg, variables = load_checkpoint(Path(_HF.value))
        tokenizer_spec, prompt = _HF.value, ""
    tokenizer = load_tokenizer(_TOKENIZER.value or tokenizer_spec)
    if _PROMPT_FILE.value is not None:
        prompt = Path(_PROMPT_FILE.value).read_text(encoding="utf-8")
    elif _PROMPT.value is not None:
        prompt = _PROMPT.value
    ids = tokenizer.encode(prompt) or ([tokenizer.bos_id] if tokenizer.bos_id is not None else [tokenizer.eos_id])
    max_new = _MAX_NEW.value
    if len(ids) + max_new > cfg.max_position_embeddings:
        _usage_error(
            f"the prompt ({len(ids)} tokens) + --max-new-tokens {max_new} exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}"
        )

    generated: list[int] = []
    shown = [""]
    clock: list[float] = []

    def stream(tokens_BK, counts_B):
        clock.append(time.perf_counter())
        generated.extend(int(t) for t in tokens_BK[0, : int(counts_B[0])])
        text = tokenizer.decode(generated)
        if text.startswith(shown[0]):  # print the new suffix (a partial multi-byte character waits)
            sys.stdout.write(text[len(shown[0]) :])
            sys.stdout.flush()
            shown[0] = text

    sys.stdout.write(prompt)
    sys.stdout.flush()
    out = generate(
        cfg,
        variables,
        [ids],
        max_new_tokens=max_new,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        stop_tokens=[tokenizer.eos_id] if tokenizer.eos_id is not None else (),
        seed=_SEED.value,
        speculative=_SPECULATIVE.value,
        draft_tokens=_DRAFT.value,
        stream=stream,
    )
    n = int(out.lengths[0])
    final = tokenizer.decode(out.tokens[0, :n].tolist())
    if final.startswith(shown[0]):
        sys.stdout.write(final[len(shown[0]) :])
    print()
    elapsed = clock[-1] - clock[0] if len(clock) > 1 else float("nan")
    rate = (n - 1) / elapsed if elapsed > 0 else float("nan")  # tokens after the first one, over the time between
    steps = int(out.forward_steps[0])
    parts = [f"{n} tokens", f"{rate:.1f} tokens/s decode"]
    if _SPECULATIVE.value:
        drafted = steps * _DRAFT.value
        parts.append(f"acceptance {int(out.accepted_drafts[0]) / max(drafted, 1):.3f}")
        parts.append(f"{(n - 1) / max(steps, 1):.2f} tokens per verify step (k={_DRAFT.value})")
    else:
        parts.append("1.00 tokens per forward (plain)")
    print("stats: " + ", ".join(parts))
