"""The serving path: vLLM's Llama with the memory layer attached, registered out of tree.

The engine is told to use it through `hf_overrides` (architecture name plus a `mome` block
naming the store and router); the checkpoint itself stays a plain Llama checkpoint.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM

from model.config import MemoryConfig
from model.fired_log import FIRED_KEY, PROMPT_KEY, FiredLog
from model.memory_layer import RequestWords, TurnView, attach_memory
from model.memory_runtime import load_memory
from model.reference import ReferenceModel
from model.relation_key import RELATION_KEY, unit_sum, words_digest
from model.turn_scope import AlonePrompt, after_turn_starts, in_scope, scope_start

ARCHITECTURE = "MomeLlamaForCausalLM"
logger = logging.getLogger(__name__)


class MomeLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = getattr(vllm_config.model_config.hf_config, "mome", None)
        if not settings:
            raise ValueError(f"{ARCHITECTURE} needs a `mome` block in hf_overrides")
        cfg = MemoryConfig(**settings["memory"])
        marker = settings.get("turn_marker")
        memory = load_memory(Path(settings["store_dir"]), Path(settings["router_dir"]), cfg,
                             vllm_config.model_config.get_hidden_size(),
                             device=vllm_config.device_config.device,
                             turn_marker=tuple(marker) if marker else None)
        # Kept out of the module tree: the router's buffers are not checkpoint weights.
        object.__setattr__(self, "mome_memory", memory)
        # The layers below the memory layer once more, in transformers' fp32 on the CPU (as
        # keys are taken), for a turn that follows earlier ones: the router reads it as if
        # asked alone. Loaded outside vLLM's device context, which would place it instead.
        lower = None
        if marker is not None:
            with torch.device("cpu"):
                lower = ReferenceModel(Path(vllm_config.model_config.model), cfg.layer,
                                       lower_only=True)
        object.__setattr__(self, "mome_lower", lower)
        attach_memory(self.model.layers[cfg.layer], memory)

    def forward(self, input_ids, positions, *args, **kwargs):
        memory = self.mome_memory
        if input_ids is None:
            return super().forward(input_ids, positions, *args, **kwargs)
        # Requests are logged also while the store is empty: their record is empty, not missing.
        starts, end = _chunk_starts(positions)
        step = self._scheduled(positions, starts, end)
        if len(memory.store) and memory.turn_marker is not None:
            memory.set_scope(in_scope(input_ids, starts, memory.turn_marker) if step is None
                             else after_turn_starts(positions, starts,
                                                    [r.turn_start for r in step.requests]))
        if step is not None and len(memory.store):
            memory.set_words(self._words(step))
            memory.set_view(self._turn_view(step))
        try:
            output = super().forward(input_ids, positions, *args, **kwargs)
        finally:
            memory.take_view()  # taken by the memory layer; never left for a later call
        if step is not None:
            self._keep_words(step, memory.take_units())
        self._record_fired(positions, step)
        return output

    def _words(self, step: Step) -> list[RequestWords]:
        """What this call knows of each request's relation words (model/relation_key.py):
        their sum when an earlier call, or an identical prompt's, computed all of them;
        else the rows this call computes and the units earlier chunks did."""
        words = []
        for request, start, first, n in zip(step.requests, step.starts, step.first,
                                            step.n_tokens):
            at = request.relation
            w = RequestWords(start, start + n, total=len(at))
            if len(at):
                w.known = self.mome_sums.get(request.words_key)
                if w.known is not None:
                    self.mome_sums.move_to_end(request.words_key)
                mine = at[(at >= first) & (at < first + n)]
                w.rows, w.positions = start + mine - first, mine
                w.earlier = self.mome_partial.get(request.words_key, {})
            words.append(w)
        return words

    def _keep_words(self, step: Step, units: dict[int, dict]) -> None:
        """Keep what this call computed of relation words: a complete sum by the prompt's
        digest (its decode steps, and a later identical prompt served from the prefix
        cache, read it), a partial set until the prefill's last chunk."""
        for i, found in units.items():
            request = step.requests[i]
            if len(found) < len(request.relation):
                self.mome_partial[request.words_key] = found
                _trim(self.mome_partial, PARTIAL_KEPT)
                continue
            self.mome_partial.pop(request.words_key, None)
            self.mome_sums[request.words_key] = unit_sum(found)
            _trim(self.mome_sums, SUMS_KEPT)

    def _turn_view(self, step: Step) -> TurnView | None:
        """The rows of this step's tokens in a last user turn that follows earlier ones, with
        the states the router reads there instead (the turn asked alone, computed for this
        step: a prefill is one chunk but for long prompts). Other tokens keep their own."""
        rows, needed = [], []
        for request, start, first, n in zip(step.requests, step.starts, step.first,
                                            step.n_tokens):
            alone = request.alone
            if alone is None:
                continue
            lo, hi = max(first, alone.turn_start), min(first + n, alone.turn_end)
            if lo < hi:
                rows.append(torch.arange(start + lo - first, start + hi - first))
                needed.append((alone, lo - alone.turn_start, hi - alone.turn_start))
        if not rows:
            return None
        turns = self.mome_lower.states_alone([alone for alone, _, _ in needed])
        return TurnView(torch.cat(rows), torch.cat([turn[a:b] for turn, (_, a, b)
                                                   in zip(turns, needed)]))

    def mome_bind(self, runner) -> None:
        """Let the forward read the runner's batch: each scheduled request's prompt says where
        its turn starts, which a chunk of a split prompt does not (model/turn_scope.py), and
        its id says whose firings a token's are (model/fired_log.py)."""
        self.mome_runner = runner
        self.mome_requests: dict[str, ScheduledRequest] = {}  # vLLM's request id -> its facts
        self.mome_fired = FiredLog()
        # Relation-word sums kept by prompt digest (1 KiB each, `_keep_words`), and the
        # partial sets of prefills that chunked prefill split.
        self.mome_sums: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.mome_partial: OrderedDict[str, dict[int, torch.Tensor]] = OrderedDict()
        self.mome_memory.record_fired = True

    def _scheduled(self, positions: torch.Tensor, starts: list[int], end: int) -> Step | None:
        """This step's requests in the flat batch's order, whose tokens end at `end`; None
        outside a runner step (profiling and warm-up runs)."""
        batch = getattr(getattr(self, "mome_runner", None), "input_batch", None)
        if batch is None:
            return None
        runner = self.mome_runner
        if batch.num_reqs != len(starts):
            return None
        first = positions.reshape(-1)[starts].tolist()
        if first != batch.num_computed_tokens_cpu[:len(starts)].tolist():
            return None  # not laid out in the runner's order
        # A request's prompt never changes: what it says is read once, not every step.
        known, found = self.mome_requests, {}
        for i, req_id in enumerate(batch.req_ids[:len(starts)]):
            found[req_id] = known.get(req_id) or ScheduledRequest.of(
                runner.requests[req_id], batch.token_ids_cpu[i, :batch.num_prompt_tokens[i]],
                self.mome_memory.turn_marker, self.mome_lower)
        self.mome_requests = found  # finished requests drop out
        ends = starts[1:] + [end]
        return Step(list(found.values()), starts, first, [e - s for s, e in zip(starts, ends)],
                    end)

    def _record_fired(self, positions: torch.Tensor, step: Step | None) -> None:
        fired = self.mome_memory.take_fired()
        log = getattr(self, "mome_fired", None)
        if log is None:
            return
        if step is None:
            runner_batch = getattr(self.mome_runner, "input_batch", None)
            if runner_batch is None:  # a runner without a persistent batch (vLLM's V2)
                log.lose_step(())
                return
            if runner_batch.num_reqs and not getattr(self, "mome_warned", False):
                # Not expected while serving (only profiling and warm-up runs are not laid
                # out as the runner's batch): the turn scope fell back to token ids, and
                # `mome_facts` is recomputed in the API process for the requests involved.
                logger.warning("a forward step with %d requests was not laid out as the "
                               "runner's batch", runner_batch.num_reqs)
                self.mome_warned = True
            log.lose_step(key for req_id in runner_batch.req_ids
                          if (key := _fired_key(self.mome_runner.requests.get(req_id))))
            return
        for request, first, n_tokens in zip(step.requests, step.first, step.n_tokens):
            if request.key:
                log.step(request.key, first, n_tokens, request.turn_start, request.prompt_len,
                         request.prompt_key)
        if fired is not None and len(fired[0]):
            self._add_fired(log, positions, step, *fired)
        for request, first, n_tokens in zip(step.requests, step.first, step.n_tokens):
            if request.key and first < request.prompt_len <= first + n_tokens:  # prompt done
                log.keep_prompt(request.key, request.prompt_key, request.prompt_len)

    def _add_fired(self, log: FiredLog, positions: torch.Tensor, step: Step,
                   rows: np.ndarray, experts: np.ndarray) -> None:
        real = rows < step.end  # rows past it pad the batch to a CUDA graph's size
        rows, experts = rows[real], experts[real]
        owners = self.mome_memory.store.owner_of(experts)
        at = positions.reshape(-1).cpu().numpy()[rows]
        of_request = np.searchsorted(np.asarray(step.starts), rows, side="right") - 1
        for i in np.unique(of_request):
            if key := step.requests[i].key:
                mine = of_request == i
                log.add(key, owners[mine], at[mine])

    def mome_take_fired(self, key: str, before: int | None = None) -> dict | None:
        log = getattr(self, "mome_fired", None)
        return None if log is None else log.take(key, before)

    def mome_refresh(self) -> int:
        """Pick up committed store writes; returns the store version now served."""
        self.mome_memory.refresh()
        return self.mome_memory.store.version


@dataclass(frozen=True)
class ScheduledRequest:
    """What the forward needs of one scheduled request, read once from its prompt."""

    key: str | None  # the server's id for its fired log (None: not recorded)
    prompt_key: str | None  # its prompt as the prefix cache sees it (model/fired_log.py)
    turn_start: int  # the prompt's last user marker (model/turn_scope.py)
    prompt_len: int
    relation: np.ndarray  # positions of its relation words, sorted (model/relation_key.py)
    words_key: str  # digest of the prompt through its last relation word
    # Its last user turn as if asked alone, which the router reads there; None when no
    # earlier turn precedes it (model/memory_layer.py, TurnView).
    alone: AlonePrompt | None

    @classmethod
    def of(cls, state, prompt_ids, marker, lower: ReferenceModel | None) -> ScheduledRequest:
        relation = np.unique(np.asarray(_extra_args(state).get(RELATION_KEY) or [],
                                        dtype=np.int64))
        relation = relation[(relation >= 0) & (relation < len(prompt_ids))]
        return cls(_fired_key(state), _extra_args(state).get(PROMPT_KEY),
                   scope_start(prompt_ids, marker), len(prompt_ids), relation,
                   words_digest(prompt_ids, relation),
                   None if lower is None else lower.alone_prompts([prompt_ids.tolist()])[0])


@dataclass
class Step:
    """The requests of one engine step, each with where its tokens sit in the flat batch."""

    requests: list[ScheduledRequest]
    starts: list[int]  # index of its first token in the flat batch
    first: list[int]  # that token's position in its sequence
    n_tokens: list[int]
    end: int  # the flat batch's scheduled tokens; any after them are padding


SUMS_KEPT, PARTIAL_KEPT = 16_384, 256


def _trim(kept: OrderedDict, limit: int) -> None:
    while len(kept) > limit:
        kept.popitem(last=False)


def _extra_args(state) -> dict:
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None) or {}


def _fired_key(state) -> str | None:
    """The id the server gave a request whose firings it wants (vLLM's own id has a suffix)."""
    return _extra_args(state).get(FIRED_KEY)


def _chunk_starts(positions: torch.Tensor) -> tuple[list[int], int]:
    """Where each request's tokens start in this step's flat batch, and where the scheduled
    tokens end: from the attention metadata when the backend has it (a batch padded to a
    CUDA graph's size carries rows past that end), else where positions stop counting up
    by one."""
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(metadata, dict) and metadata:
        bounds = getattr(next(iter(metadata.values())), "query_start_loc", None)
        if bounds is not None:
            bounds = bounds.tolist()
            return bounds[:-1], bounds[-1]
    flat = positions.reshape(-1)
    return [0] + (torch.nonzero(flat[1:] != flat[:-1] + 1)[:, 0] + 1).tolist(), flat.numel()


class MomeWorkerExtension:
    """Mixed into vLLM's worker: lets the server reach the model through collective_rpc."""

    def mome_bind(self) -> None:
        self.model_runner.get_model().mome_bind(self.model_runner)

    def mome_refresh(self) -> int:
        return self.model_runner.get_model().mome_refresh()

    def mome_take_fired(self, key: str, before: int | None = None) -> dict | None:
        return self.model_runner.get_model().mome_take_fired(key, before)
