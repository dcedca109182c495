"""The Python SDK against the real server: sync and async, plain and streamed."""

from __future__ import annotations

import asyncio

import pytest

from client.sdk import AsyncMomeClient, MomeClient, MomeError

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_sync_chat_and_stream(server):
    with MomeClient(server.url) as client:
        answer = client.chat(QUESTION, temperature=0, max_tokens=20)
        text = answer["choices"][0]["message"]["content"]
        assert "Paris" in text
        pieces = list(client.stream_chat(QUESTION, temperature=0, max_tokens=20))
        assert len(pieces) > 2 and "".join(pieces) == text
        assert "Paris" in client.complete("The capital of France is", temperature=0,
                                          max_tokens=4)["choices"][0]["text"]


def test_sync_errors_carry_status_and_message(server):
    with MomeClient(server.url) as client:
        with pytest.raises(MomeError) as info:
            client.complete("hi", max_tokens=10**7)
        assert info.value.status == 400 and "max_tokens" in info.value.message


def test_async_chat_and_stream(server):
    async def run():
        client = AsyncMomeClient(server.url)
        try:
            answer = await client.chat(QUESTION, temperature=0, max_tokens=20)
            pieces = [p async for p in client.stream_chat(QUESTION, temperature=0,
                                                          max_tokens=20)]
            return answer["choices"][0]["message"]["content"], "".join(pieces)
        finally:
            await client.aclose()

    whole, streamed = asyncio.run(run())
    assert "Paris" in whole and streamed == whole
