"""Bad input on the real server: always a clear 4xx in OpenAI's error shape, never a 500."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow

KEY = "test-admin-key"
ADMIN_ROUTES = [
    ("POST", "/v1/facts", {"facts": [{"prompt": "The sky is", "completion": "green"}]}),
    ("GET", "/v1/facts", None),
    ("GET", "/v1/facts/fact-1", None),
    ("DELETE", "/v1/facts/fact-1", None),
    ("GET", "/v1/jobs/job-1", None),
    ("GET", "/v1/memory", None),
]


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == response.status_code
    return error


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong-key",
                                           f"Basic {KEY}", f"Bearer {KEY}x"])
def test_every_admin_route_needs_the_key(server, method, path, body, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
    assert assert_openai_error(response, 401)["type"] == "authentication_error"


SURROGATE = "\ud800"  # valid JSON ("\\ud800"), not valid text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": SURROGATE, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": SURROGATE}]}),
    ("/v1/chat/completions", {"model": "M", "stop": [SURROGATE],
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "M", "stop": "",
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "M", "stop": ["ok", ""],
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "M", "prompt": f"a{SURROGATE}b"}),
    ("/v1/completions", {"model": "M", "prompt": "hi", SURROGATE: 1}),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": SURROGATE}),
    ("/v1/facts", {"facts": [{"prompt": SURROGATE, "completion": "x"}]}),
    ("/v1/facts", {"facts": [{"question": "Who?", "answer": SURROGATE}]}),
    ("/v1/facts", {"facts": [{"prompt": "p", "completion": "x", SURROGATE: "y"}]}),
])
def test_unusable_text_is_a_4xx(server, model_name, path, body):
    if body.get("model") == "M":
        body = {**body, "model": model_name}
    # Escaped as JSON allows ("\\ud800"); httpx's own encoder would refuse to send it.
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body).encode(),
                          headers={"Authorization": f"Bearer {KEY}",
                                   "content-type": "application/json"})
    assert_openai_error(response)


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_of_no_tokens_is_a_400(server, model_name, stream):
    # Found by the fuzzer: "\u0014" tokenizes to nothing, and the engine refused it with a 500.
    response = httpx.post(f"{server.url}/v1/completions",
                          json={"model": model_name, "prompt": "\u0014", "stream": stream})
    assert assert_openai_error(response, 400)["param"] == "prompt"


def test_a_prompt_too_long_names_prompt(server, model_name):
    response = httpx.post(f"{server.url}/v1/completions",
                          json={"model": model_name, "prompt": "word " * 5000})
    assert assert_openai_error(response, 400)["param"] == "prompt"


def test_bodies_over_the_limit_are_413(server):
    big = b'{"facts": [' + b" " * (17 << 20) + b"]}"
    response = httpx.post(f"{server.url}/v1/facts", content=big,
                          headers={"Authorization": f"Bearer {KEY}",
                                   "content-type": "application/json"})
    assert "larger than" in assert_openai_error(response, 413)["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * (1 << 20)

    response = httpx.post(f"{server.url}/v1/completions", content=chunks(),
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


def test_too_many_facts_in_one_request_is_refused(server):
    facts = [{"prompt": "p", "completion": "c"}] * 10_001
    response = httpx.post(f"{server.url}/v1/facts", json={"facts": facts},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert "10000" in assert_openai_error(response, 422)["message"]


def test_metrics_label_routes_by_template(server):
    for path in ("/v1/no-such-route-7f3a", "/v1/facts/fact-424242", "/v1/facts/fact-434343"):
        httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {KEY}"})
    text = httpx.get(f"{server.url}/metrics").text
    assert "no-such-route-7f3a" not in text and "fact-424242" not in text
    assert 'route="unmatched"' in text and 'route="/v1/facts/{fact_id}"' in text


def test_facts_are_listed_in_pages(server):
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    listed = admin.get("/v1/facts", params={"limit": 1000}).json()
    page = admin.get("/v1/facts", params={"limit": 1}).json()
    assert len(page["data"]) == min(1, len(listed["data"]))
    assert page["has_more"] == (len(listed["data"]) > 1)
    assert_openai_error(admin.get("/v1/facts", params={"limit": 0}), 422)
    assert_openai_error(admin.get("/v1/facts", params={"after": "bogus"}), 400)
    assert_openai_error(admin.get("/v1/facts", params={"status": "bogus"}), 422)



@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, -600000646497322536412381184])
def test_a_seed_beyond_64_bits_samples_as_its_64_bit_image(server, model_name, seed):
    """Found by the fuzz test: such a seed reached the engine, which cannot serialize it (500).
    It is served, reproducibly, as the 64-bit seed it maps to."""
    from server.protocol import engine_seed

    texts = []
    for sent in (seed, engine_seed(seed)):
        body = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 6,
                "temperature": 1.0, "seed": sent}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    assert -(2**63) <= engine_seed(seed) < 2**63 and engine_seed(2**63 - 1) == 2**63 - 1
