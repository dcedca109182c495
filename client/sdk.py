"""A small Python SDK for a mome server: chat and completions, sync and async, streaming."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class MomeError(RuntimeError):
    """An error answer from the server, with its HTTP status and OpenAI-shaped message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    raise MomeError(response.status_code, message)


def _sse_payloads(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)


def _delta_text(payload: dict) -> str:
    choice = (payload.get("choices") or [{}])[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


class MomeClient:
    """Synchronous client. `model=None` uses the first model the server lists."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self._model: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MomeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model(self) -> str:
        if self._model is None:
            response = self._http.get("/v1/models")
            _raise_for_error(response)
            self._model = response.json()["data"][0]["id"]
        return self._model

    def request(self, method: str, path: str, **kwargs) -> dict:
        response = self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    def chat(self, messages: list[dict], **params) -> dict:
        body = {"model": self.model(), "messages": messages, **params}
        return self.request("POST", "/v1/chat/completions", json=body)

    def complete(self, prompt: str, **params) -> dict:
        body = {"model": self.model(), "prompt": prompt, **params}
        return self.request("POST", "/v1/completions", json=body)

    # ---- facts (admin key needed) --------------------------------------------------------

    def add_facts(self, facts: list[dict]) -> dict:
        """Queue facts for memorization; returns {"job_id", "fact_ids"}."""
        return self.request("POST", "/v1/facts", json={"facts": facts})

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def wait_for_job(self, job_id: str, poll: float = 1.0, timeout: float = 7200,
                     on_progress=None) -> dict:
        """Poll a job until it is done; `on_progress(job)` sees every poll."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] == "done":
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout}s")
            time.sleep(poll)

    def list_facts(self, status: str | None = None) -> list[dict]:
        params = {"status": status} if status else None
        return self.request("GET", "/v1/facts", params=params)["data"]

    def get_fact(self, fact_id: str) -> dict:
        return self.request("GET", f"/v1/facts/{fact_id}")

    def delete_fact(self, fact_id: str) -> None:
        response = self._http.delete(f"/v1/facts/{fact_id}")
        _raise_for_error(response)

    def stream_chat(self, messages: list[dict], **params) -> Iterator[str]:
        """Yield the answer's text pieces as the server streams them."""
        body = {"model": self.model(), "messages": messages, "stream": True, **params}
        with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                response.read()
                _raise_for_error(response)
            for payload in _sse_payloads(response.iter_lines()):
                yield _delta_text(payload)


class AsyncMomeClient:
    """Asynchronous twin of `MomeClient`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        self._model: str | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def model(self) -> str:
        if self._model is None:
            response = await self._http.get("/v1/models")
            _raise_for_error(response)
            self._model = response.json()["data"][0]["id"]
        return self._model

    async def request(self, method: str, path: str, **kwargs) -> dict:
        response = await self._http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    async def chat(self, messages: list[dict], **params) -> dict:
        body = {"model": await self.model(), "messages": messages, **params}
        return await self.request("POST", "/v1/chat/completions", json=body)

    async def complete(self, prompt: str, **params) -> dict:
        body = {"model": await self.model(), "prompt": prompt, **params}
        return await self.request("POST", "/v1/completions", json=body)

    async def add_facts(self, facts: list[dict]) -> dict:
        return await self.request("POST", "/v1/facts", json={"facts": facts})

    async def job(self, job_id: str) -> dict:
        return await self.request("GET", f"/v1/jobs/{job_id}")

    async def list_facts(self) -> list[dict]:
        return (await self.request("GET", "/v1/facts"))["data"]

    async def delete_fact(self, fact_id: str) -> None:
        _raise_for_error(await self._http.delete(f"/v1/facts/{fact_id}"))

    async def stream_chat(self, messages: list[dict], **params) -> AsyncIterator[str]:
        body = {"model": await self.model(), "messages": messages, "stream": True, **params}
        async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                await response.aread()
                _raise_for_error(response)
            async for line in response.aiter_lines():
                for payload in _sse_payloads(iter([line])):
                    yield _delta_text(payload)
