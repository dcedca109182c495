"""Schemathesis checks loaded by the fuzz test (SCHEMATHESIS_HOOKS): every error a route
returns has OpenAI's shape."""

from __future__ import annotations

import os
import random

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
    """Two requests in three name the served model, so that generation runs too (a random
    `model` is always refused before the engine is reached)."""
    model = os.environ.get("MOME_FUZZ_MODEL")
    if model and isinstance(body, dict) and "model" in body and random.random() < 2 / 3:
        return {**body, "model": model}
    return body
