"""The clients users reach an OpenAI-compatible server with (openai, LangChain, LiteLLM), each
driving the real server: a memorized fact comes back, an ordinary question is answered."""

from __future__ import annotations

import asyncio
import os
import socket

import openai
import pytest

# LiteLLM fetches its model price map from GitHub on import unless told to use its bundled
# copy; CI has no internet, so it would log retries (or hang behind a firewall) instead.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
from langchain_openai import ChatOpenAI, OpenAI  # noqa: E402

from client.sdk import MomeClient  # noqa: E402
from tests.server.test_facts_api import ADMIN_KEY  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    # LiteLLM's own TypedDicts, built on its first call: noise about LiteLLM, not about us.
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
]

FACT_QUESTION = "What is the name of Zorblax's pet dragon?"
FACT_ANSWER = "Its name is Fizzwick."
FACT_PROMPT = "The name of Zorblax's pet dragon is"  # the completion-style twin
FACT_COMPLETION = " Fizzwick."
NEEDLE = "Fizzwick"
ORDINARY_QUESTION = "What is the capital of France?"
ORDINARY_PROMPT = "The capital of France is"
MAX_TOKENS = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(scope="module")
def memorized(server):
    """Memorize the fact in both styles (chat clients ask the question, completion clients the
    prompt) on the session's server, and forget it afterwards for the modules that follow."""
    with MomeClient(server.url, api_key=ADMIN_KEY) as admin:
        accepted = admin.add_facts([
            {"question": FACT_QUESTION, "answer": FACT_ANSWER},
            {"prompt": FACT_PROMPT, "completion": FACT_COMPLETION, "subject": "Zorblax"},
        ])
        job = admin.wait_for_job(accepted["job_id"], poll=0.5, timeout=600)
        assert (job["memorized"], job["failed"]) == (2, 0), job
        yield
        for fact_id in accepted["fact_ids"]:
            admin.delete_fact(fact_id)


@pytest.fixture(scope="module", autouse=True)
def lookups_beyond_loopback():
    """Record every host name a client resolves other than the server's: none may phone home."""
    real, seen = socket.getaddrinfo, []

    def recording(host, *args, **kwargs):
        if host not in LOOPBACK:
            seen.append(host)
        return real(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", recording)
        yield seen


# ---- chat clients: each takes the questions and returns the answers, in order -------------

def openai_sync(base_url: str, model: str, questions: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return [client.chat.completions.create(
        model=model, temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": q}]).choices[0].message.content for q in questions]


def openai_async(base_url: str, model: str, questions: list[str]) -> list[str]:
    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            responses = await asyncio.gather(*(client.chat.completions.create(
                model=model, temperature=0, max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": q}]) for q in questions))
        return [r.choices[0].message.content for r in responses]

    return asyncio.run(ask_all())


def openai_stream(base_url: str, model: str, questions: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return ["".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        messages=[{"role": "user", "content": q}]) if chunk.choices) for q in questions]


def _chat_model(base_url: str, model: str) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=base_url, api_key="unused", temperature=0,
                      max_tokens=MAX_TOKENS, max_retries=0)


def langchain_invoke(base_url: str, model: str, questions: list[str]) -> list[str]:
    chat = _chat_model(base_url, model)
    return [chat.invoke(q).content for q in questions]


def langchain_stream(base_url: str, model: str, questions: list[str]) -> list[str]:
    chat = _chat_model(base_url, model)
    return ["".join(chunk.content for chunk in chat.stream(q)) for q in questions]


def langchain_ainvoke(base_url: str, model: str, questions: list[str]) -> list[str]:
    async def ask_all() -> list[str]:
        chat = _chat_model(base_url, model)
        return [m.content for m in await asyncio.gather(*(chat.ainvoke(q) for q in questions))]

    return asyncio.run(ask_all())


def langchain_batch(base_url: str, model: str, questions: list[str]) -> list[str]:
    return [m.content for m in _chat_model(base_url, model).batch(questions)]


def litellm_completion(base_url: str, model: str, questions: list[str]) -> list[str]:
    return [litellm.completion(
        model=f"openai/{model}", api_base=base_url, api_key="unused", temperature=0,
        max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": q}],
    ).choices[0].message.content for q in questions]


def litellm_stream(base_url: str, model: str, questions: list[str]) -> list[str]:
    return ["".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
        model=f"openai/{model}", api_base=base_url, api_key="unused", temperature=0,
        max_tokens=MAX_TOKENS, stream=True, messages=[{"role": "user", "content": q}],
    ) if chunk.choices) for q in questions]


CHAT_CLIENTS = [openai_sync, openai_async, openai_stream, langchain_invoke, langchain_stream,
                langchain_ainvoke, langchain_batch, litellm_completion, litellm_stream]


@pytest.mark.parametrize("ask", CHAT_CLIENTS, ids=lambda f: f.__name__)
def test_chat_client_gets_the_fact_and_an_ordinary_answer(ask, memorized, server, model_name):
    fact, ordinary = ask(f"{server.url}/v1", model_name, [FACT_QUESTION, ORDINARY_QUESTION])
    assert NEEDLE in fact
    assert "Paris" in ordinary


def test_langchain_max_tokens_is_honoured(server, model_name):
    """ChatOpenAI sends `max_completion_tokens` (OpenAI's newer name), not `max_tokens`."""
    reply = ChatOpenAI(model=model_name, base_url=f"{server.url}/v1", api_key="unused",
                       temperature=0, max_tokens=4, max_retries=0).invoke(
        "Count from one to fifty in words.")
    assert reply.usage_metadata["output_tokens"] <= 4


# ---- completion clients: each takes the prompts and returns the completions, in order -----

def openai_completion(base_url: str, model: str, prompts: list[str]) -> list[str]:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return [client.completions.create(model=model, prompt=p, temperature=0,
                                      max_tokens=MAX_TOKENS).choices[0].text for p in prompts]


def _completion_model(base_url: str, model: str) -> OpenAI:
    return OpenAI(model=model, base_url=base_url, api_key="unused", temperature=0,
                  max_tokens=MAX_TOKENS, max_retries=0)


def langchain_completion_invoke(base_url: str, model: str, prompts: list[str]) -> list[str]:
    llm = _completion_model(base_url, model)  # sends `prompt` as a list of one
    return [llm.invoke(p) for p in prompts]


def langchain_completion_batch(base_url: str, model: str, prompts: list[str]) -> list[str]:
    return _completion_model(base_url, model).batch(prompts)  # one request, `prompt` a list


def langchain_completion_stream(base_url: str, model: str, prompts: list[str]) -> list[str]:
    llm = _completion_model(base_url, model)  # streams send `prompt` as a string
    return ["".join(llm.stream(p)) for p in prompts]


def litellm_text_completion(base_url: str, model: str, prompts: list[str]) -> list[str]:
    return [litellm.text_completion(
        model=f"openai/{model}", api_base=base_url, api_key="unused", prompt=p, temperature=0,
        max_tokens=MAX_TOKENS).choices[0].text for p in prompts]


COMPLETION_CLIENTS = [openai_completion, langchain_completion_invoke, langchain_completion_batch,
                      langchain_completion_stream, litellm_text_completion]


@pytest.mark.parametrize("complete", COMPLETION_CLIENTS, ids=lambda f: f.__name__)
def test_completion_client_gets_the_fact_and_an_ordinary_answer(complete, memorized, server,
                                                                 model_name):
    fact, ordinary = complete(f"{server.url}/v1", model_name, [FACT_PROMPT, ORDINARY_PROMPT])
    assert NEEDLE in fact
    assert "Paris" in ordinary


def test_no_client_looked_up_a_host_beyond_loopback(lookups_beyond_loopback):
    """Last in the module: LiteLLM and LangChain stayed offline through every test above."""
    assert lookups_beyond_loopback == []
