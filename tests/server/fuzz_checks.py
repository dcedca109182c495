"""Schemathesis checks loaded by the fuzz test (SCHEMATHESIS_HOOKS): every error a route
returns has OpenAI's shape."""

from __future__ import annotations

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
