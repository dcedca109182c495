"""Seconds per training step with the layers above the memory layer in fp32 and in a bf16 copy,
at chat-batch shapes (rows x 20 tokens, the vocabulary projection at 4 positions per row),
forward and backward to a value added at the memory layer, one thread; the best of 3 steps
after a warm-up, each shape twice. A one-off measurement for reports/METHODS.md (not a
benchmark). Usage, from the repository root: python reports/train-step-offline/bf16_chat_step.py
"""

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import default_model_dir  # noqa: E402

MEMORY_LAYER = 10


def seconds_per_step(model, dtype: torch.dtype, rows: int, tokens: int, answers: int,
                     steps: int = 3) -> float:
    layers = model.model.layers[MEMORY_LAYER + 1:]
    h0 = torch.randn(rows, tokens, model.config.hidden_size, dtype=dtype)
    value = torch.zeros(model.config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(rows, -1)
    rope = model.model.rotary_emb(h0, position_ids=positions)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        h = h0 + value.to(dtype)
        for layer in layers:
            h = layer.forward(h, attention_mask=None, position_ids=positions,
                              position_embeddings=rope)
        model.lm_head(model.model.norm(h[:, -answers:])).float().sum().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    fp32 = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    fp32.eval().requires_grad_(False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for rows in (5, 20, 80):
        for _ in range(2):
            a = seconds_per_step(fp32, torch.float32, rows, 20, 4)
            b = seconds_per_step(bf16, torch.bfloat16, rows, 20, 4)
            print(f"rows {rows} tokens 20: fp32 {a:.3f} s  bf16 {b:.3f} s  "  # noqa: T201
                  f"ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
