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
from model.turn_scope import in_scope

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
            memory.set_scope(in_scope(input_ids, _chunk_starts(positions), memory.turn_marker))
        return super().forward(input_ids, positions, *args, **kwargs)

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

    def mome_refresh(self) -> int:
        return self.model_runner.get_model().mome_refresh()
