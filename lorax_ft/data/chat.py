"""Instruction/chat examples: format a conversation, tokenize it, train only on assistant turns.

A record is `{"prompt", "completion"}` (one user turn, one assistant turn) or `{"messages": [{"role",
"content"}, ...]}`. The conversation is rendered by a `format_chat(messages) -> str` callable (the
model's chat template; `chatml` by default) and tokenized once. An assistant turn's answer is its
content plus whatever the template puts after it (the end-of-turn marker), found as a character
span by rendering the conversation up to that turn; a token is trained if its first character
lies in an answer span, so the mask is right even where the tokenizer merges across the
boundary. Requires only that the template renders a conversation's prefix as a prefix of the
text, which holds for ChatML, Llama, Gemma and Mistral templates.

Fields (length `max_length`, right-padded with `pad_id`): `input_ids`, `labels` (next token,
already shifted), `loss_mask` (1 on answer tokens), `attention_mask`, `weights` = 1.

>>> ex = encode_chat(to_messages({"prompt": "Hi", "completion": "Hello"}), tok,
...                  max_length=16, pad_id=0, eos_id=1)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lorax_ft.data.errors import DataError

Message = dict[str, str]
FormatChat = Callable[[Sequence[Message]], str]
ROLES = ("system", "user", "assistant")


def chatml(messages: Sequence[Message]) -> str:
    """Renders messages in ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

    >>> chatml([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n'
    """
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def plain(messages: Sequence[Message]) -> str:
    """Concatenates contents with no markup: a prompt/completion record becomes `prompt+completion`.

    >>> plain([{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}])
    '2+2=4'
    """
    return "".join(m["content"] for m in messages)


CHAT_FORMATS: dict[str, FormatChat] = {"chatml": chatml, "plain": plain}


def to_messages(record: dict[str, Any], where: str = "record") -> list[Message]:
    """Validates a chat record and returns its messages; errors name `where` (e.g. `file:line`).

    >>> to_messages({"prompt": "Hi", "completion": "Hello"})[1]
    {'role': 'assistant', 'content': 'Hello'}
    """
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    elif "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(
                    f"{where}: {key!r} must be a string, got {type(record[key]).__name__}"
                )
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise DataError(
            f"{where}: expected keys 'prompt' and 'completion', or 'messages'; got {sorted(record)}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: message {i} needs a string 'content' and a 'role', got {repr(m)[:60]}"
            )
        if m.get("role") not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {m.get('role')!r}; valid roles: {', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so there is nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def answer_spans(messages: Sequence[Message], format_chat: FormatChat) -> tuple[str, list]:
    """Renders `messages` and returns `(text, [(start, end), ...])`, one span per assistant turn.

    >>> answer_spans([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], plain)
    ('ab', [(1, 2)])
    """
    text = format_chat(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = format_chat(messages[:i]), format_chat(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                "format_chat must render a conversation's first turns as a prefix of the whole "
                f"conversation; it does not at message {i}"
            )
        # rfind: the header before the content (e.g. "assistant\n") may contain the same words.
        start = upto.rfind(m["content"], len(before))
        if start < 0:
            start = upto.rfind(m["content"].strip(), len(before))
        if start < 0:
            raise DataError(f"format_chat does not reproduce the content of message {i}")
        spans.append((start, len(upto)))
    return text, spans


def encode_chat(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    *,
    max_length: int,
    pad_id: int,
    format_chat: FormatChat = chatml,
    eos_id: int | None = None,
    bos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes one conversation into a fixed-length example with an answer-only loss mask.

    Args:
      messages: Validated messages (see `to_messages`).
      tokenizer: A `tokenizers.Tokenizer`; its post-processor is not applied (`bos_id`/`eos_id`
        are added explicitly instead).
      max_length: Example length; longer conversations are cut at the end.
      pad_id: Token for padding positions (masked out of attention and loss).
      format_chat: Chat template.
      eos_id: Optional token appended at the end; trained when the last turn is the assistant's,
        so the model learns to stop.
      bos_id: Optional token prepended.

    Returns:
      The example dict (see the module docstring).
    """
    text, spans = answer_spans(messages, format_chat)
    enc = tokenizer.encode(text, add_special_tokens=False)
    answer = [any(s <= off[0] < e for s, e in spans) for off in enc.offsets]
    ids = list(enc.ids)
    if bos_id is not None:
        ids, answer = [bos_id, *ids], [False, *answer]
    if eos_id is not None:
        ids, answer = [*ids, eos_id], [*answer, messages[-1]["role"] == "assistant"]
    ids, answer = ids[: max_length + 1], answer[: max_length + 1]
    n = len(ids) - 1
    example = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "labels": np.full(max_length, pad_id, np.int32),
        "loss_mask": np.zeros(max_length, np.float32),
        "attention_mask": np.zeros(max_length, np.int32),
        "weights": np.float32(1.0),
    }
    if n > 0:
        example["input_ids"][:n] = ids[:-1]
        example["labels"][:n] = ids[1:]
        example["loss_mask"][:n] = answer[1:]
        example["attention_mask"][:n] = 1
    return example
