"""The Ling chat format: exact rendering, an exact assistant-only mask, and clear errors for bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_jax.data import chat
from ling_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS = TOK.eos_id


def _text(ids):
    return bytes(i for i in ids if i < 256).decode()


def test_render_is_the_ling_template_with_one_stop_token_per_turn():
    messages = chat.conversation("347+85", "432", think=False)
    ids, mask = chat.render(messages, TOK)
    expected = (
        list(b"<role>SYSTEM</role>detailed thinking off")
        + [EOS]
        + list(b"<role>HUMAN</role>347+85")
        + [EOS]
        + list(b"<role>ASSISTANT</role>432")
        + [EOS]
    )
    assert ids.tolist() == expected and ids.dtype == np.int32
    # exactly the assistant's content and its role end are masked in
    assert mask.tolist() == [False] * (len(expected) - 4) + [True] * 4
    assert chat.role_end_id(TOK) == EOS


def test_mask_covers_every_assistant_turn_and_nothing_else():
    messages = [
        {"role": "system", "content": chat.SYSTEM_THINK_ON},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "<think>1+1+0=02</think>2"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = chat.render(messages, TOK)
    assert _text(ids[mask]) == "<think>1+1+0=02</think>24"
    assert int((ids[mask] == EOS).sum()) == 2  # each assistant turn's stop token is trained on
    assert "ASSISTANT" not in _text(ids[mask]) and "ASSISTANT" in _text(ids[~mask])


def test_render_prompt_is_the_rendered_conversation_up_to_the_reply():
    full, mask = chat.render(chat.conversation("12-5", "7", think=True), TOK)
    prompt = chat.render_prompt(chat.conversation("12-5", think=True), TOK)
    assert full[: len(prompt)].tolist() == prompt.tolist()
    assert not mask[: len(prompt)].any() and mask[len(prompt) :].all()
    assert _text(prompt).endswith("<role>ASSISTANT</role>")
    with pytest.raises(ValueError, match="ends with a user message"):
        chat.render_prompt(chat.conversation("1+1", "2", think=False), TOK)


class _SpecialTokenizer(ByteTokenizer):
    """A tokenizer with <|role_end|> as one token (like the official Ling tokenizer.json)."""

    ROLE_END_ID = 257

    def encode(self, text):
        ids, rest = [], text
        while chat.ROLE_END in rest:
            head, rest = rest.split(chat.ROLE_END, 1)
            ids += list(head.encode()) + [self.ROLE_END_ID]
        return ids + list(rest.encode())


def test_a_tokenizer_with_a_role_end_token_uses_it():
    tok = _SpecialTokenizer()
    assert chat.role_end_id(tok) == tok.ROLE_END_ID
    ids, mask = chat.render(chat.conversation("1+2", "3", think=False), tok)
    assert int((ids == tok.ROLE_END_ID).sum()) == 3 and EOS not in ids.tolist()
    assert ids[mask].tolist() == [ord("3"), tok.ROLE_END_ID]


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hi", "must be a list of messages"),
        ([], "messages is empty"),
        ([{"role": "user"}], "message 0 has no 'content'"),
        ([{"content": "x"}], "message 0 has no 'role'"),
        ([{"role": "robot", "content": "x"}], "message 0 has unknown role 'robot'"),
        ([{"role": "user", "content": 3}], r"message 0 \(user\) content must be a string"),
        (["user: hi"], "message 0 must be an object"),
        ([{"role": "user", "content": "a", "name": "x"}], "unknown field"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only the first message"),
        ([{"role": "assistant", "content": "a"}], "no user message"),
        ([{"role": "user", "content": "a"}], "the last message is the user's"),
    ],
)
def test_bad_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render(messages, TOK)


def test_read_jsonl_and_its_errors(tmp_path):
    good = {"messages": chat.conversation("1+1", "2", think=False)}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert chat.read_jsonl(path) == [good["messages"]] * 2
    cases = [
        ("{not json", "chat.jsonl:2: not valid JSON"),
        (json.dumps({"text": "x"}), "chat.jsonl:2: each line must be an object with a 'messages' list"),
        (
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}),
            "chat.jsonl:2: message 1 has unknown role 'bot'",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}),
            "chat.jsonl:2: message 1 has no 'content'",
        ),
    ]
    for bad, match in cases:
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=match):
            chat.read_jsonl(path)
    with pytest.raises(ValueError, match="does not exist"):
        chat.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no conversations"):
        chat.read_jsonl(tmp_path / "empty.jsonl")
