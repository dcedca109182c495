"""vLLM plugin entry point (group `vllm.general_plugins`): registers the memory model.

vLLM loads general plugins in every process it starts (engine core, workers), so process-wide
adjustments for serving beside memorization belong here too.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    if "MomeLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("MomeLlamaForCausalLM",
                                     "model.vllm_model:MomeLlamaForCausalLM")
    _stop_idle_spinning_on_cpu()


def _stop_idle_spinning_on_cpu() -> None:
    """On CPU, make vLLM's processes sleep between messages instead of spinning.

    vLLM's shared-memory message queue (engine core <-> worker) busy-loops for a second after
    every message, for latency on a GPU host. On a CPU host those spinning processes take the
    very cores the memorizer trains on: training a fact after a verification ran at about half
    speed. A reader that polls its notification socket instead costs microseconds per step.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    if getattr(condition.__init__, "_mome_no_spin", False):
        return
    original = condition.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.busy_loop_s = 0.0

    init._mome_no_spin = True
    condition.__init__ = init
