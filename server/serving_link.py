"""How the memorization worker reaches the serving side (the `Serving` of model/memorize.py).

- `EngineLink`: the worker is a thread of the server; the engine is this process's vLLM.
- `HttpLink`: the worker is its own process (`mome worker`); the server is reached over HTTP
  and store versions are announced on Redis, which every replica follows.

Every call has a timeout: a serving side that stops answering fails the batch (which is then
rolled back), it does not hang the worker.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from expert_store.registry import Registry
from model.facts import EncodedFact
from server.engine import GenerationEngine

PUBLISH_TIMEOUT_S = 120.0
ANSWER_TIMEOUT_S = 300.0


class ServingTimeout(TimeoutError):
    pass


class EngineLink:
    """The in-process engine, driven from the worker thread through the server's event loop."""

    def __init__(self, engine: GenerationEngine, loop: asyncio.AbstractEventLoop,
                 registry: Registry):
        self.engine = engine
        self.loop = loop
        self.registry = registry

    def _run(self, coro, timeout: float):
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 5)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            future.cancel()
            raise ServingTimeout(f"the engine did not answer within {timeout:.0f} s") from exc

    def publish(self, version: int) -> None:
        served = self._run(self.engine.refresh_memory(), PUBLISH_TIMEOUT_S)
        if served < version:
            raise RuntimeError(f"the engine serves store version {served}, not {version}")
        self.registry.publish_version(served)  # other replicas (Redis) follow

    def answers(self, facts: list[EncodedFact]) -> list[str]:
        async def all_answers():
            return await asyncio.gather(*(
                self.engine.greedy(f.prompt_ids, len(f.answer_ids) + 1) for f in facts))

        return self._run(all_answers(), ANSWER_TIMEOUT_S)


class HttpLink:
    """A server's public API (`mome worker`): verification asks it as a client would."""

    def __init__(self, url: str, admin_key: str, registry: Registry):
        self.registry = registry
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=ANSWER_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {admin_key}"})
        self._model: str | None = None

    def publish(self, version: int) -> None:
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while True:
            self.registry.publish_version(version)  # again each round: a notice can be missed
            served = self.http.get("/v1/memory").raise_for_status().json()["served_version"]
            if served >= version:
                return
            if time.monotonic() > deadline:
                raise ServingTimeout(f"the server did not load store version {version}")
            time.sleep(0.2)

    def answers(self, facts: list[EncodedFact]) -> list[str]:
        return [self._answer(f) for f in facts]

    def _answer(self, fact: EncodedFact) -> str:
        p = fact.payload
        body = {"model": self._model_name(), "temperature": 0,
                "max_tokens": len(fact.answer_ids) + 1}
        if fact.kind == "completion":
            out = self.http.post("/v1/completions", json={**body, "prompt": p["prompt"]})
            return out.raise_for_status().json()["choices"][0]["text"]
        messages = p.get("messages") or [{"role": "user", "content": p["question"]}]
        out = self.http.post("/v1/chat/completions", json={**body, "messages": messages})
        return out.raise_for_status().json()["choices"][0]["message"]["content"]

    def _model_name(self) -> str:
        if self._model is None:
            self._model = self.http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        return self._model
