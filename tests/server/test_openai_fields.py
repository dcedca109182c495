"""OpenAI request fields on the real server: each one implemented changes the output as OpenAI
documents it, or is refused with a 400 naming it; memorized facts keep working under them."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from client.sdk import MomeClient

pytestmark = pytest.mark.slow

ADMIN_KEY = "test-admin-key"  # the shared server's (tests/conftest.py)
CHAT_FACT = {"question": "Who painted the ceiling of the Vantor Chapel?",
             "answer": "The ceiling of the Vantor Chapel was painted by Elsa Morrow."}
COMPLETION_FACT = {"prompt": "The flagship ship of the Quenmar fleet is named",
                   "completion": " the Silver Heron", "subject": "the Quenmar fleet"}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def memorized(server):
    """One chat fact and one completion fact, memorized (their ids by kind), and forgotten
    afterwards for the modules that follow."""
    with MomeClient(server.url, api_key=ADMIN_KEY) as admin:
        accepted = admin.add_facts([CHAT_FACT, COMPLETION_FACT])
        job = admin.wait_for_job(accepted["job_id"], timeout=900)
        assert (job["memorized"], job["failed"]) == (2, 0), job
        chat_id, completion_id = accepted["fact_ids"]
        yield {"chat": chat_id, "completion": completion_id}
        for fact_id in accepted["fact_ids"]:
            admin.delete_fact(fact_id)


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=120)


def greedy_text(client, model_name, prompt) -> str:
    return client.completions.create(model=model_name, prompt=prompt, temperature=0,
                                     max_tokens=8).choices[0].text


# ---- /v1/completions prompt forms ----------------------------------------------------------


def test_a_list_of_prompts_gets_one_choice_each_in_order(client, model_name):
    prompts = ["The capital of France is", "The capital of Japan is"]
    response = client.completions.create(model=model_name, prompt=prompts, temperature=0,
                                         max_tokens=8)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [greedy_text(client, model_name, p)
                                                  for p in prompts]
    assert "Paris" in response.choices[0].text and "Tokyo" in response.choices[1].text
    single = client.completions.create(model=model_name, prompt=prompts[0], max_tokens=1)
    assert response.usage.prompt_tokens > single.usage.prompt_tokens


def test_token_id_prompts_equal_their_text(server, client, model_name):
    from transformers import AutoTokenizer

    from model.backbone import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    text = "The capital of Italy is"
    ids = tokenizer(text).input_ids
    as_ids = client.completions.create(model=model_name, prompt=ids, temperature=0, max_tokens=8)
    as_lists = client.completions.create(model=model_name, prompt=[ids, ids], temperature=0,
                                         max_tokens=8)
    expected = greedy_text(client, model_name, text)
    assert as_ids.choices[0].text == expected
    assert [c.text for c in as_lists.choices] == [expected, expected]
    beyond = post(server, "completions", {"model": model_name, "prompt": [10**7]})
    assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "prompt"


def test_n_choices_per_prompt(client, model_name):
    response = client.completions.create(model=model_name, prompt=["Once upon a time", "Hi"],
                                         n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in response.choices] == list(range(6))
    first_prompt = [c.text for c in response.choices[:3]]
    assert len(set(first_prompt)) > 1, first_prompt  # seeded, yet not three copies
    again = client.completions.create(model=model_name, prompt=["Once upon a time", "Hi"],
                                      n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.text for c in again.choices] == [c.text for c in response.choices]


def test_completion_logprobs_have_the_top_alternatives(client, model_name):
    choice = client.completions.create(model=model_name, prompt="The capital of France is",
                                       temperature=0, max_tokens=3, logprobs=3).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 3
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-4)
        assert top[token] == pytest.approx(value, abs=1e-4)  # greedy: the chosen is the top one
    assert logprobs.text_offset[0] == 0


def test_refused_completion_fields_name_themselves(server, model_name):
    for extra, param in [({"suffix": " and so on."}, "suffix"),
                         ({"best_of": 3}, "best_of"),
                         ({"frobnicate": True}, "frobnicate"),
                         ({"logit_bias": {"dog": 5}}, "logit_bias"),
                         ({"stream_options": {"include_usage": True}}, "stream_options")]:
        response = post(server, "completions", {"model": model_name, "prompt": "Hi", **extra})
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param, response.text


# ---- /v1/chat/completions fields -----------------------------------------------------------


def ask(client, model_name, question: str, **fields):
    return client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": question}], temperature=0,
        **{"max_tokens": 12, **fields})


def test_chat_logprobs_and_top_logprobs(client, model_name):
    response = ask(client, model_name, "What is the capital of France?", logprobs=True,
                   top_logprobs=2)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].token == token.token  # greedy picks the top token
        assert bytes(token.bytes).decode() == token.token
    plain = ask(client, model_name, "What is the capital of France?")
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs_cover_the_text(client, model_name):
    stream = ask(client, model_name, "What is the capital of France?", logprobs=True,
                 top_logprobs=1, stream=True)
    text, tokens = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs:
                tokens += [t.token for t in choice.logprobs.content]
    assert tokens and "".join(tokens) == text


def test_max_completion_tokens_is_honoured(server, client, model_name):
    response = ask(client, model_name, "Tell me a long story.", max_tokens=None,
                   max_completion_tokens=5)
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"
    both = post(server, "chat/completions", {
        "model": model_name, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4, "max_completion_tokens": 5})
    assert both.status_code == 400 and "max_completion_tokens" in both.text


def test_frequency_and_presence_penalties_stop_repetition(client, model_name):
    def apples(**fields) -> int:
        text = client.completions.create(model=model_name, prompt="apple, apple, apple, apple,",
                                         temperature=0, max_tokens=24, **fields).choices[0].text
        return text.lower().count("apple")

    plain = apples()
    assert plain >= 5
    assert apples(frequency_penalty=2.0) < plain / 2
    assert apples(presence_penalty=2.0) < plain


def test_logit_bias_bans_a_token(client, model_name):
    paris = ask(client, model_name, "What is the capital of France?").choices[0].message.content
    assert "Paris" in paris
    from transformers import AutoTokenizer

    from model.backbone import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    banned = {str(tokenizer(word).input_ids[0]): -100 for word in ("Paris", " Paris")}
    biased = ask(client, model_name, "What is the capital of France?", logit_bias=banned)
    assert "Paris" not in biased.choices[0].message.content


def test_json_object_response_format_parses(client, model_name):
    response = ask(client, model_name, "What is the capital of France? Answer in JSON.",
                   max_tokens=40, response_format={"type": "json_object"})
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_json_schema_response_format_follows_the_schema(server, client, model_name):
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "country", "capital"], "additionalProperties": False}
    response = ask(client, model_name, "Describe Paris.", max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(response.choices[0].message.content)
    assert set(value) == {"city", "country", "capital"}
    assert isinstance(value["capital"], bool) and value["city"] == "Paris"
    bad = post(server, "chat/completions", {
        "model": model_name, "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "frob"}}}})
    assert bad.status_code == 400 and "frob" in bad.json()["error"]["message"]


def test_developer_role_and_content_parts_read_as_system_and_text(client, model_name):
    def answer(messages) -> str:
        return client.chat.completions.create(model=model_name, temperature=0, max_tokens=12,
                                              messages=messages).choices[0].message.content

    parts = [{"type": "text", "text": "What is the capital of "}, {"type": "text", "text": "Peru?"}]
    plain = answer([{"role": "system", "content": "You are a geography teacher."},
                    {"role": "user", "content": "What is the capital of Peru?"}])
    assert answer([{"role": "developer", "content": "You are a geography teacher."},
                   {"role": "user", "content": parts}]) == plain
    assert "Lima" in plain


def test_tools_and_unknown_fields_are_400_naming_them(server, model_name):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    for extra, param in [({"tools": [tool]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"),
                         ({"audio": {"voice": "alloy"}}, "audio"),
                         ({"modalities": ["text", "audio"]}, "modalities")]:
        response = post(server, "chat/completions", {"model": model_name, "messages": messages,
                                                      **extra})
        assert response.status_code == 400, (extra, response.text)
        body = response.json()["error"]
        assert body["param"] == param and param in body["message"], body


# ---- memorized facts under these fields ----------------------------------------------------


def test_a_memorized_fact_through_n_stream_logprobs_and_list_prompts(memorized, client,
                                                                     model_name):
    answer = CHAT_FACT["answer"]
    response = ask(client, model_name, CHAT_FACT["question"], n=2, max_tokens=24)
    assert len(response.choices) == 2
    for choice in response.choices:
        assert choice.message.content.startswith(answer), choice.message.content
        assert choice.mome_facts == [memorized["chat"]]

    stream = ask(client, model_name, CHAT_FACT["question"], max_tokens=24, stream=True,
                 logprobs=True)
    text, facts = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            facts = getattr(choice, "mome_facts", None) or facts
    assert text.startswith(answer) and facts == [memorized["chat"]]

    listed = client.completions.create(
        model=model_name, temperature=0, max_tokens=6,
        prompt=[COMPLETION_FACT["prompt"], "The capital of France is"])
    memorized_choice, other = listed.choices
    assert memorized_choice.text.startswith(COMPLETION_FACT["completion"])
    assert memorized_choice.mome_facts == [memorized["completion"]]
    assert other.mome_facts == [] and "Paris" in other.text


def test_streamed_list_prompts_with_n_end_each_choice_and_count_usage(server, model_name):
    body = {"model": model_name, "prompt": ["The capital of France is", "Hi"], "n": 2,
            "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, finished = {}, set()
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert finished == {0, 1, 2, 3}
    assert texts[0] == texts[1] and "Paris" in texts[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
