"""vLLM plugin entry point (group `vllm.general_plugins`): registers the memory model."""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    if "MomeLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("MomeLlamaForCausalLM",
                                     "model.vllm_model:MomeLlamaForCausalLM")
