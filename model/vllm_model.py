"""The serving path: vLLM's Llama with the memory layer attached, registered out of tree.

The engine is told to use it through `hf_overrides` (architecture name plus a `mome` block
naming the store and router); the checkpoint itself stays a plain Llama checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM

from model.config import MemoryConfig
from model.memory_layer import attach_memory
from model.memory_runtime import load_memory
from model.turn_scope import after_turn_starts, in_scope, scope_start

ARCHITECTURE = "MomeLlamaForCausalLM"


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
        attach_memory(self.model.layers[cfg.layer], memory)

    def forward(self, input_ids, positions, *args, **kwargs):
        memory = self.mome_memory
        if input_ids is not None and memory.turn_marker is not None and len(memory.store):
            starts = _chunk_starts(positions)
            turns = self._turn_starts(positions, starts)
            memory.set_scope(in_scope(input_ids, starts, memory.turn_marker) if turns is None
                             else after_turn_starts(positions, starts, turns))
        return super().forward(input_ids, positions, *args, **kwargs)

    def mome_bind(self, runner) -> None:
        """Let the forward read the runner's batch: each scheduled request's prompt says where
        its turn starts, which a chunk of a split prompt does not (model/turn_scope.py)."""
        self.mome_runner = runner
        self.mome_turn_starts: dict[str, int] = {}  # request id -> its turn start

    def _turn_starts(self, positions: torch.Tensor, starts: list[int]) -> list[int] | None:
        """Each scheduled request's turn start (its prompt's last user marker), in the flat
        batch's order; None outside a runner step (profiling and warm-up runs)."""
        runner = getattr(self, "mome_runner", None)
        if runner is None:
            return None
        batch = runner.input_batch
        if batch.num_reqs != len(starts):
            return None
        first = positions.reshape(-1)[starts].tolist()
        if first != batch.num_computed_tokens_cpu[:len(starts)].tolist():
            return None  # not laid out in the runner's order: keep the rule on token ids
        # A request's prompt never changes: its turn start is found once, not every step.
        known, found = self.mome_turn_starts, {}
        for i, req_id in enumerate(batch.req_ids[:len(starts)]):
            found[req_id] = known.get(req_id)
            if found[req_id] is None:
                found[req_id] = scope_start(batch.token_ids_cpu[i, :batch.num_prompt_tokens[i]],
                                            self.mome_memory.turn_marker)
        self.mome_turn_starts = found  # finished requests drop out
        return list(found.values())

    def mome_refresh(self) -> int:
        """Pick up committed store writes; returns the store version now served."""
        self.mome_memory.refresh()
        return self.mome_memory.store.version


def _chunk_starts(positions: torch.Tensor) -> list[int]:
    """Where each request's tokens start in this step's flat batch: from the attention
    metadata when the backend has it, else where positions stop counting up by one."""
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(metadata, dict) and metadata:
        starts = getattr(next(iter(metadata.values())), "query_start_loc", None)
        if starts is not None:
            return starts[:-1].tolist()
    flat = positions.reshape(-1)
    return [0] + (torch.nonzero(flat[1:] != flat[:-1] + 1)[:, 0] + 1).tolist()


class MomeWorkerExtension:
    """Mixed into vLLM's worker: lets the server reach the model through collective_rpc."""

    def mome_bind(self) -> None:
        self.model_runner.get_model().mome_bind(self.model_runner)

    def mome_refresh(self) -> int:
        return self.model_runner.get_model().mome_refresh()
