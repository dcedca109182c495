"""The serving path: vLLM's Llama with the memory layer attached, registered out of tree.

The engine is told to use it through `hf_overrides` (architecture name plus a `mome` block
naming the store and router); the checkpoint itself stays a plain Llama checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from vllm.model_executor.models.llama import LlamaForCausalLM

from model.config import MemoryConfig
from model.memory_layer import attach_memory
from model.memory_runtime import load_memory

ARCHITECTURE = "MomeLlamaForCausalLM"


class MomeLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = getattr(vllm_config.model_config.hf_config, "mome", None)
        if not settings:
            raise ValueError(f"{ARCHITECTURE} needs a `mome` block in hf_overrides")
        cfg = MemoryConfig(**settings["memory"])
        memory = load_memory(Path(settings["store_dir"]), Path(settings["router_dir"]), cfg,
                             vllm_config.model_config.get_hidden_size(),
                             device=vllm_config.device_config.device)
        # Kept out of the module tree: the router's buffers are not checkpoint weights.
        object.__setattr__(self, "mome_memory", memory)
        attach_memory(self.model.layers[cfg.layer], memory)

    def mome_refresh(self) -> int:
        """Pick up committed store writes; returns the store version now served."""
        self.mome_memory.refresh()
        return self.mome_memory.store.version


class MomeWorkerExtension:
    """Mixed into vLLM's worker: lets the server reach the model through collective_rpc."""

    def mome_refresh(self) -> int:
        return self.model_runner.get_model().mome_refresh()
