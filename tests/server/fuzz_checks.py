"""Schemathesis checks and hooks loaded by the fuzz test (SCHEMATHESIS_HOOKS): every error a
route returns has OpenAI's shape."""

from __future__ import annotations

import json
import os

import schemathesis


@schemathesis.check
def openai_error_shape(ctx, response, case):
    if response.status_code < 400:
        return None
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        raise AssertionError(f"error body not in OpenAI's shape: {response.text[:300]}")
    if error["code"] != response.status_code:
        raise AssertionError(f"error code {error['code']} != status {response.status_code}")
    return None


@schemathesis.hook
def map_body(context, body):
    """One generation request in three names the served model and asks for at most 4 tokens,
    so that the engine runs on the fuzzed sampling fields (a random `model` or `max_tokens`
    past the context is refused before the engine is reached). Deterministic per body, as
    hypothesis needs. Only valid values are replaced by valid ones: a body generated to be
    invalid stays invalid (negative_data_rejection sees the body sent)."""
    model = os.environ.get("MOME_FUZZ_MODEL")
    if not (model and isinstance(body, dict) and isinstance(body.get("model"), str)):
        return body
    if len(json.dumps(body, sort_keys=True, default=str)) % 3 != 0:
        return body
    body = {**body, "model": model}
    tokens = body.get("max_tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1:
        body["max_tokens"] = min(tokens, 4)
    return body
