"""Seconds per training step with the backbone's weights in fp32 and in a bf16 copy.

A one-off measurement for reports/METHODS.md (not a benchmark): the layers above the memory
layer over a 6-token suffix and the vocabulary projection at 2 positions, forward and
backward to a value added at the memory layer, one thread, 10 steps, each way twice.
Usage, from the repository root: python reports/train-step-offline/bf16_step.py
"""

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import default_model_dir  # noqa: E402

MEMORY_LAYER = 10


def seconds_per_step(model, dtype: torch.dtype, tokens: int = 6, steps: int = 10) -> float:
    layers = model.model.layers[MEMORY_LAYER + 1:]
    h0 = torch.randn(1, tokens, model.config.hidden_size, dtype=dtype)
    value = torch.zeros(model.config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rope = model.model.rotary_emb(h0, position_ids=positions)
    start = time.perf_counter()
    for _ in range(steps):
        h = h0 + value.to(dtype)
        for layer in layers:
            h = layer.forward(h, attention_mask=None, position_ids=positions,
                              position_embeddings=rope)
        model.lm_head(model.model.norm(h[:, -2:])).float().sum().backward()
    return (time.perf_counter() - start) / steps


def main() -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    fp32 = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    fp32.eval().requires_grad_(False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for _ in range(2):
        print(f"fp32 {seconds_per_step(fp32, torch.float32):.3f} s/step  "  # noqa: T201
              f"bf16 {seconds_per_step(bf16, torch.bfloat16):.3f} s/step")


if __name__ == "__main__":
    main()
