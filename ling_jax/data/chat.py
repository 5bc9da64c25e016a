"""The Ling chat format: messages -> token ids, with a mask of the tokens the assistant wrote.

A conversation renders as the released Ling models' template,

    <role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>347+85<|role_end|>
    <role>ASSISTANT</role>432<|role_end|>

(one line; the break above is for reading). Roles: "system" -> SYSTEM, "user" -> HUMAN,
"assistant" -> ASSISTANT. The post-training recipe (../shared/docs/ling2-spec.md, "Post-training")
uses two system prompts: `SYSTEM_THINK_OFF` (answer directly) and `SYSTEM_THINK_ON` (reason inside
<think>...</think>, then answer); the strings are the released models' spelling.

`<|role_end|>` closes each turn. A tokenizer that has it as one token (the official Ling
tokenizer.json) uses that id; one that does not (the byte tokenizer would spell it in 12 bytes)
uses its eos id instead, so an assistant turn always ends with one stop token (`role_end_id`),
which is what generation stops on.

Each piece (role header, content, role end) is encoded on its own and the ids concatenated, so the
boundary between what the user and the assistant wrote is exact for any tokenizer.
`render(messages, tokenizer)` returns the ids and `assistant_mask`: 1 on the tokens of every
assistant turn's content and its role end (what SFT trains on), 0 on system and user turns and on
the `<role>ASSISTANT</role>` headers. `render_prompt` renders a conversation for generation: the
messages, then an open `<role>ASSISTANT</role>` header.

`read_jsonl(path)` reads SFT data, one {"messages": [{"role": ..., "content": ...}, ...]} object per
line; each bad line is a ValueError naming the file, the line and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ling_jax.data.tokenizer import Tokenizer

SYSTEM_THINK_OFF = "detailed thinking off"
SYSTEM_THINK_ON = "detailed thinking on"
ROLE_TAGS = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}
ROLE_END = "<|role_end|>"


def role_header(role: str) -> str:
    return f"<role>{ROLE_TAGS[role]}</role>"


def system_prompt(think: bool) -> str:
    return SYSTEM_THINK_ON if think else SYSTEM_THINK_OFF


def role_end_id(tokenizer: Tokenizer) -> int:
    """The one id that closes a turn: `<|role_end|>` when the tokenizer has it as a single token,
    else its eos id. Generation stops on it."""
    ids = tokenizer.encode(ROLE_END)
    return int(ids[0]) if len(ids) == 1 else int(tokenizer.eos_id)


class RenderedChat(NamedTuple):
    ids_L: np.ndarray  # [L] int32 token ids
    assistant_mask_L: np.ndarray  # [L] bool: tokens the assistant wrote (content and role end)


def validate_messages(messages, where: str = "conversation", *, final_assistant: bool = True) -> list[dict]:
    """The messages as a list of {"role", "content"} dicts, or ValueError naming `where`, the
    message's index and the problem. With `final_assistant`, the last message must be the
    assistant's (training data); every conversation needs at least one user message."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"{where}: messages must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: messages is empty")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where}: message {i} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: message {i} has no {key!r} field")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise ValueError(f"{where}: message {i} has unknown field(s) {unknown} (only 'role' and 'content')")
        role, content = message["role"], message["content"]
        if role not in ROLE_TAGS:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; the roles are {sorted(ROLE_TAGS)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: message {i} is a system message; only the first message may be")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in clean):
        raise ValueError(f"{where}: no user message")
    if final_assistant and clean[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message is the {clean[-1]['role']}'s; training data ends with the assistant's"
        )
    return clean


def _pieces(tokenizer: Tokenizer, messages: list[dict]):
    """(ids, written by the assistant) for each piece of the rendered conversation."""
    end = [role_end_id(tokenizer)]
    for m in messages:
        assistant = m["role"] == "assistant"
        yield tokenizer.encode(role_header(m["role"])), False
        yield tokenizer.encode(m["content"]), assistant
        yield end, assistant


def render(messages, tokenizer: Tokenizer, where: str = "conversation") -> RenderedChat:
    """Token ids of a whole conversation and its assistant mask (see the module docstring)."""
    messages = validate_messages(messages, where)
    ids, mask = [], []
    for piece, assistant in _pieces(tokenizer, messages):
        ids.extend(piece)
        mask.extend([assistant] * len(piece))
    return RenderedChat(np.asarray(ids, np.int32), np.asarray(mask, bool))


def render_prompt(messages, tokenizer: Tokenizer, where: str = "prompt") -> np.ndarray:
    """Token ids for generation: the conversation so far (ending with a user message), then
    `<role>ASSISTANT</role>`; the model writes the reply and its role end."""
    messages = validate_messages(messages, where, final_assistant=False)
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: a prompt ends with a user message, not the {messages[-1]['role']}'s")
    ids = [i for piece, _ in _pieces(tokenizer, messages) for i in piece]
    ids.extend(tokenizer.encode(role_header("assistant")))
    return np.asarray(ids, np.int32)


def conversation(user: str, assistant: str | None = None, *, think: bool) -> list[dict]:
    """[system (think on / off), user(, assistant)] messages."""
    messages = [{"role": "system", "content": system_prompt(think)}, {"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSONL file of {"messages": [...]} lines (blank lines skipped).
    ValueError naming the file, the line number and the problem for any bad line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"chat data file {path} does not exist or is not a file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise ValueError(f"{where}: each line must be an object with a 'messages' list")
            conversations.append(validate_messages(record["messages"], where))
    if not conversations:
        raise ValueError(f"chat data file {path} holds no conversations")
    return conversations
