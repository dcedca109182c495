"""The OpenAI routes on the real server, driven by the `openai` package and httpx."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_chat_answers_capital_of_france(client, model_name):
    response = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_sends_several_chunks_then_done(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert "Paris" in "".join(pieces)
    assert chunks[-1].usage is not None
    # Some tokens detokenize to no text yet, so pieces can be fewer than tokens, never more.
    assert chunks[-1].usage.completion_tokens >= len(pieces)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")


def test_stream_matches_non_stream_at_temperature_zero(client, model_name):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=model_name, temperature=0, max_tokens=20,
                                           messages=messages).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=model_name, temperature=0, max_tokens=20,
                                                messages=messages, stream=True)
        if c.choices
    )
    assert streamed == whole


def test_raw_sse_framing(server, model_name):
    body = {"model": model_name, "prompt": "The capital of France is", "max_tokens": 6,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) >= 3


def test_completion(client, model_name):
    response = client.completions.create(model=model_name, prompt="The capital of France is",
                                         temperature=0, max_tokens=5)
    assert "Paris" in response.choices[0].text
    assert response.usage.completion_tokens == 5
    assert response.choices[0].finish_reason == "length"


def test_stop_sequence_and_seeded_sampling(client, model_name):
    stopped = client.completions.create(model=model_name, prompt="1, 2, 3, 4,", temperature=0,
                                        max_tokens=30, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    runs = [client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=12,
                                      temperature=1.0, top_p=0.9, seed=1234).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_health_metrics(server, model_name, client):
    assert [m.id for m in client.models.list().data] == [model_name]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.completions.create(model=model_name, prompt="Hello", max_tokens=2, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("mome_requests_total", "mome_prompt_tokens_total",
                 "mome_generation_tokens_total", "mome_request_latency_seconds_bucket",
                 "mome_time_to_first_token_seconds_bucket", "mome_requests_running"):
        assert name in text
    generated = [line for line in text.splitlines()
                 if line.startswith("mome_generation_tokens_total")]
    assert float(generated[0].split()[-1]) >= 2


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=60, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    if param is not None:
        assert error["param"] == param


def test_unknown_model_is_400(server):
    response = _post(server, "/v1/chat/completions",
                     json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    _assert_openai_error(response, 400, "model")
    assert "gpt-9" in response.json()["error"]["message"]


def test_openai_client_raises_on_unknown_model(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)


def test_empty_messages_is_422(server, model_name):
    response = _post(server, "/v1/chat/completions", json={"model": model_name, "messages": []})
    _assert_openai_error(response, 422, "messages")


def test_max_tokens_beyond_context_is_400(server, model_name):
    response = _post(server, "/v1/completions",
                     json={"model": model_name, "prompt": "hi", "max_tokens": 10**6})
    _assert_openai_error(response, 400, "max_tokens")


def test_prompt_longer_than_context_is_400(server, model_name):
    response = _post(server, "/v1/completions",
                     json={"model": model_name, "prompt": "word " * 5000, "max_tokens": 1})
    assert response.status_code == 400


def test_malformed_json_is_422(server):
    response = _post(server, "/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    _assert_openai_error(response, 422)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
])
def test_wrong_fields_are_422_with_param(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    _assert_openai_error(_post(server, path, json=body), 422, param)


def test_health_was_503_while_loading(server):
    # The fixture polled /health from the first moment the port answered.
    assert server.loading_bodies, "the server never answered while its engine was loading"
    body = server.loading_bodies[0]
    assert body["error"]["code"] == 503 and "loading" in body["error"]["message"]


def test_echo_logprobs_give_prompt_perplexity(server, model_name):
    body = {"model": model_name, "prompt": "The capital of France is Paris.", "max_tokens": 1,
            "temperature": 0, "echo": True, "logprobs": 0}
    choice = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["text"].startswith("The capital of France is Paris.")
    values = choice["logprobs"]["token_logprobs"]
    assert values[0] is None and all(v <= 0 for v in values[1:])
    assert len(values) == len(choice["logprobs"]["tokens"]) >= 7
    # A true sentence is far likelier than the same words shuffled.
    shuffled = {**body, "prompt": "Paris capital is France the of."}
    other = httpx.post(f"{server.url}/v1/completions", json=shuffled, timeout=60).json()
    assert sum(values[1:-1]) > sum(other["choices"][0]["logprobs"]["token_logprobs"][1:-1])


def test_idle_keep_alive_connection_outlives_the_clients(server):
    """A connection idle for longer than httpx keeps one (5 s) is still open on the server:
    with equal timeouts a client could send on a connection the server is just closing."""
    import http.client
    import time
    from urllib.parse import urlparse

    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/health")
    first = conn.getresponse()
    first.read()
    assert first.status == 200 and not first.will_close
    sock = conn.sock
    time.sleep(6)
    conn.request("GET", "/health")  # on the same socket: a closed one raises here or below
    second = conn.getresponse()
    second.read()
    assert second.status == 200 and conn.sock is sock
    conn.close()
