"""The hand-assembled stream chunks are the JSON that `json.dumps` of the same dict gives."""

from __future__ import annotations

import json

import pytest

from hf2paged.serve.responses import ChunkWriter, chat_delta_json, completion_choice_json

HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": 'm"\\'}
TEXTS = ["", "plain", 'quote " backslash \\ newline \n tab \t', "ünïcødé ✓ \u2028", "\x00\x1f"]


def parse(event: str) -> dict:
    assert event.startswith("data: ") and event.endswith("\n\n")
    return json.loads(event[6:])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("usage", [False, True])
def test_completion_chunks(text: str, usage: bool) -> None:
    logprobs = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.5}]}
    for finish, lp, ids, prompt_ids in [
        (None, None, None, None),
        ("length", logprobs, [1, 2], [3]),
        ("stop", None, [], None),
    ]:
        event = ChunkWriter(HEAD, usage).event(
            completion_choice_json(4, text, finish, lp, ids, prompt_ids)
        )
        choice = {"index": 4, "text": text, "logprobs": lp, "finish_reason": finish}
        if ids is not None:
            choice["token_ids"] = ids
        if prompt_ids is not None:
            choice["prompt_token_ids"] = prompt_ids
        expected = {**HEAD, "choices": [choice], **({"usage": None} if usage else {})}
        assert parse(event) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_chat_chunks(text: str) -> None:
    head = dict(HEAD, object="chat.completion.chunk")
    for content, finish, ids in [(text, None, None), (None, "stop", [7]), (text, "length", [])]:
        event = ChunkWriter(head, False).event(chat_delta_json(1, content, finish, None, ids))
        delta = {} if content is None else {"content": content}
        choice = {"index": 1, "delta": delta, "logprobs": None, "finish_reason": finish}
        if ids is not None:
            choice["token_ids"] = ids
        assert parse(event) == {**head, "choices": [choice]}
