"""The generation engine: vLLM's async engine, in this process, plus the tokenizer and chat template."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from model.fired_log import FIRED_KEY, PROMPT_KEY, prompt_cache_key
from model.relation_key import RELATION_KEY, relation_positions, words_digest
from model.turn_scope import scope_start, user_turn_marker
from server.settings import ServerSettings

logger = logging.getLogger(__name__)


@dataclass
class GenerationChunk:
    """New text since the previous chunk, with running token counts."""

    text: str
    token_ids: list[int]  # the tokens behind `text`
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    token_logprobs: list[float] | None = None  # of `token_ids`, when asked for
    prompt_logprobs: list[float | None] | None = None  # of the prompt, when asked for
    # Per token of `token_ids`: the k likeliest (token id, logprob), likeliest first.
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _chosen_logprobs(token_ids, logprobs) -> list[float | None] | None:
    """Log-probability of each chosen token, from vLLM's per-position dicts."""
    if logprobs is None:
        return None
    return [None if entry is None else entry[token].logprob
            for token, entry in zip(token_ids, logprobs)]


def _top_logprobs(logprobs, k: int | None) -> list[list[tuple[int, float]]] | None:
    """The k likeliest tokens at each position (vLLM adds the chosen one when it ranks lower)."""
    if logprobs is None or k is None:
        return None
    return [sorted(((token, lp.logprob) for token, lp in entry.items()),
                   key=lambda pair: -pair[1])[:k] for entry in logprobs]


class GenerationEngine:
    """Owns vLLM's AsyncLLM (its engine core runs in a child process vLLM starts)."""

    def __init__(self, settings: ServerSettings, model_dir: Path,
                 memory_overrides: dict | None = None):
        from transformers import AutoTokenizer

        self.settings = settings
        self.model_dir = model_dir
        self.model_name = settings.served_model_name or model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = settings.max_model_len
        self._engine = None
        # The `mome` block for the memory model (store and router dirs, MemoryConfig); None
        # serves the plain backbone.
        self.memory_overrides = memory_overrides
        # Salt for vLLM's prefix cache: KV computed under an older expert store must not be reused.
        self.cache_salt = "0"
        self.served_version = 0  # the expert store version the engine serves
        self.turn_marker = user_turn_marker(self.tokenizer)

    def start(self) -> None:
        """Build the vLLM engine; blocking (tens of seconds), so callers run it off the event loop."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.model_dir),
            served_model_name=self.model_name,
            dtype=self.settings.resolved_dtype(),
            max_model_len=self.max_model_len,
            max_num_seqs=self.settings.max_num_seqs,
            max_num_batched_tokens=self.settings.max_num_batched_tokens,
            kv_cache_memory_bytes=int(self.settings.kv_cache_gib * (1 << 30)),
            enforce_eager=self.settings.enforce_eager,
            enable_prefix_caching=True,
        )
        if self.memory_overrides is not None:
            from model.vllm_model import ARCHITECTURE

            # The memory model reads each step's requests from the runner's persistent batch
            # (model/vllm_model.py), which the V1 runner has; vLLM may pick its V2 runner
            # (CUDA, or a CPU build with Triton), which has none. Its processes inherit this.
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            args.hf_overrides = {"architectures": [ARCHITECTURE], "mome": self.memory_overrides}
            args.worker_extension_cls = "model.vllm_model.MomeWorkerExtension"
        self._engine = AsyncLLM.from_engine_args(args)
        logger.info("engine ready: %s (%s)", self.model_name, args.dtype)

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    def completion_prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completions prompt given as text or already as token ids."""
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt).input_ids

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    async def generate(
        self, prompt_ids: list[int], sampling_params, request_id: str,
        record_fired: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        """Yield text deltas (or one final chunk when the params ask for FINAL_ONLY).

        `record_fired`: the engine records which facts fired for this request, for
        `take_fired` once it has finished (model/fired_log.py).
        """
        from vllm.inputs import TokensPrompt

        assert self._engine is not None, "engine not started"
        words = []
        if self.memory_overrides is not None:
            # The engine checks experts' second keys against these words (relation_key.py).
            words = relation_positions(prompt_ids, self.tokenizer, self.turn_marker)
        # Experts fire from the last user turn on (model/turn_scope.py): KV of the same tokens
        # computed when an earlier turn was the last one differs, and must not be reused.
        # (Within that turn the router reads its words as if asked alone: a function of the
        # turn's start and the tokens up to them, so the salt covers it.)
        # Whether an expert adds its value at a token also depends on the turn's relation
        # words after it (model/relation_key.py): KV computed under other words is not
        # reused either.
        salt = (f"{self.cache_salt}-turn{scope_start(prompt_ids, self.turn_marker)}"
                f"-w{words_digest(prompt_ids, words)}")
        if self.memory_overrides is not None:
            extra = {RELATION_KEY: words}
            if record_fired:  # the prompt's key finds firings of KV the prefix cache serves
                extra |= {FIRED_KEY: request_id, PROMPT_KEY: prompt_cache_key(salt, prompt_ids)}
            sampling_params = sampling_params.clone()
            sampling_params.extra_args = {**(sampling_params.extra_args or {}), **extra}
        prompt = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=salt)
        completion_tokens = 0
        async for output in self._engine.generate(prompt, sampling_params, request_id):
            completion = output.outputs[0]
            completion_tokens += len(completion.token_ids)
            yield GenerationChunk(
                text=completion.text,
                token_ids=list(completion.token_ids),
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
                finish_reason=completion.finish_reason,
                token_logprobs=_chosen_logprobs(completion.token_ids, completion.logprobs),
                prompt_logprobs=_chosen_logprobs(prompt_ids, output.prompt_logprobs),
                top_logprobs=_top_logprobs(completion.logprobs, sampling_params.logprobs),
            )

    async def bind_memory(self) -> None:
        """Give the memory model the engine's batch (each request's turn start); once, after
        `start`, before serving."""
        await self._engine.collective_rpc("mome_bind")

    async def take_fired(self, request_id: str, before: int | None = None) -> dict | None:
        """The fired log's record of a finished request generated with `record_fired`: the
        owners that fired at positions below `before`, and whether the prompt or more must
        be recomputed; None without one."""
        if self.memory_overrides is None:
            return None
        records = await self._engine.collective_rpc("mome_take_fired",
                                                    args=(request_id, before))
        return next((r for r in records if r is not None), None)

    async def refresh_memory(self) -> int:
        """Make the engine serve the store's newest version; returns that version.

        The prefix-cache salt follows the version, so KV computed under older experts is
        never reused for a new request.
        """
        versions = await self._engine.collective_rpc("mome_refresh")
        version = min(versions)
        self.cache_salt = f"store-v{version}"
        self.served_version = version
        return version

    async def greedy(self, prompt_ids: list[int], max_tokens: int) -> str:
        """Greedy text for a prompt, as a client at temperature 0 would get it."""
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        text = ""
        async for chunk in self.generate(prompt_ids, params, f"verify-{uuid.uuid4().hex}"):
            text = chunk.text
        return text

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)
            await self.take_fired(request_id)  # its record will not be read: drop it
