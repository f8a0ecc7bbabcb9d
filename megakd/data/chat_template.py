"""Conversation -> token ids plus a per-token "is response" flag.

With a tokenizer that has a chat template (HuggingFace tokenizers usually do), the template
renders the conversation; the assistant turns are located by rendering prefixes of the
conversation (``messages[:k]`` with the generation prompt, ``messages[:k+1]`` without), and
the text between the two is the response: the assistant's content plus whatever the template
closes the turn with (e.g. ``<|im_end|>``). Each prompt/response piece is tokenized on its own.

Without a chat template (SentencePiece), the documented plain template is used
(docs/data.md): ``System: {content}``, ``User: {content}``, ``Assistant:`` as prompt pieces and
``{content}<EOD>`` as the response piece of each assistant turn, each tokenized on its own and
concatenated.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy

from megakd.data.chat_format import Message

PLAIN_ROLE_PREFIX = {"system": "System: ", "user": "User: "}
PLAIN_ASSISTANT_HEADER = "Assistant:"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
    return text


def _template_pieces(tokenizer, messages: Sequence[Message]) -> List[Tuple[str, bool]]:
    """``(text, is_response)`` pieces that concatenate to the template's rendering."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    pieces: List[Tuple[str, bool]] = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:k], add_generation_prompt=True)) if k else 0
        end_text = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not full.startswith(end_text) or start < cursor or start > len(end_text):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix by prefix "
                "(e.g. it rewrites earlier turns), so response tokens cannot be located")
        pieces += [(full[cursor:start], False), (full[start:len(end_text)], True)]
        cursor = len(end_text)
    pieces.append((full[cursor:], False))
    return [(text, is_response) for text, is_response in pieces if text]


def _plain_pieces(messages: Sequence[Message]) -> List[Tuple[str, bool]]:
    pieces: List[Tuple[str, bool]] = []
    for message in messages:
        if message["role"] == "assistant":
            pieces += [(PLAIN_ASSISTANT_HEADER, False), (message["content"], True)]
        else:
            pieces.append((PLAIN_ROLE_PREFIX[message["role"]] + message["content"], False))
    return pieces


def tokenize_conversation(tokenizer, messages: Sequence[Message]
                          ) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """``(ids [n] int32, is_response [n] bool)`` for one conversation."""
    templated = has_chat_template(tokenizer)
    pieces = _template_pieces(tokenizer, messages) if templated else _plain_pieces(messages)
    ids: List[int] = []
    is_response: List[bool] = []
    for text, response in pieces:
        piece = list(tokenizer.tokenize(text))
        if response and not templated:
            piece.append(tokenizer.eod)  # the plain template ends every assistant turn with EOD
        ids += piece
        is_response += [response] * len(piece)
    return numpy.asarray(ids, dtype=numpy.int32), numpy.asarray(is_response, dtype=bool)


def split_prompt(messages: Sequence[Message]) -> Tuple[List[Message], Optional[str]]:
    """(the prompt: the messages before the final assistant answer, that answer or None)."""
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[:-1]), messages[-1]["content"]
    return list(messages), None


def tokenize_prompt(tokenizer, messages: Sequence[Message]) -> List[int]:
    """The token ids a model continues to answer ``messages`` (a conversation without its
    final assistant answer): exactly the ids that precede that answer when the whole
    conversation is tokenized for training (so generation sees what training saw)."""
    with_answer = list(messages) + [{"role": "assistant", "content": "x"}]
    ids, is_response = tokenize_conversation(tokenizer, with_answer)
    start = len(ids)
    while start > 0 and is_response[start - 1]:
        start -= 1  # back over the placeholder answer (and its closing tokens)
    return [int(i) for i in ids[:start]]
