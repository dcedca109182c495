"""The reference model: transformers' Llama in fp32 with the memory layer, for memorization.

The layers below the memory layer do not depend on the experts being trained, so their output
is computed once per batch and only the layers above run at each training step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.memory_layer import MemoryLayer, attach_memory


class ReferenceModel:
    def __init__(self, model_dir: Path, layer: int, threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.layer = layer
        self.layers = self.model.model.layers
        if not 0 <= layer < len(self.layers) - 1:
            raise ValueError(f"memory layer {layer} must be below the last of {len(self.layers)}")
        self.memory: MemoryLayer | None = None
        self._hook = None

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def attach(self, memory: MemoryLayer) -> None:
        """Let `generate` and `logits` see the memory layer (training calls it explicitly)."""
        if self._hook is not None:
            self._hook.remove()
        self.memory = memory
        self._hook = attach_memory(self.layers[self.layer], memory)

    # ---- the split forward used by training -------------------------------------------------

    def _positions(self, ids: torch.Tensor):
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        h = self.model.model.embed_tokens(ids)
        return positions, self.model.model.rotary_emb(h, position_ids=positions), h

    @torch.no_grad()
    def lower(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Residual stream (B, T, d) at the memory layer's output, before any expert is added.

        Sequences in a batch are right-padded: with causal attention, pads after a token never
        affect it, so no padding mask is needed.
        """
        positions, rope, h = self._positions(ids)
        for layer in self.layers[: self.layer + 1]:
            # .forward, not __call__: the memory hook on this layer must not fire here.
            h = layer.forward(h, attention_mask=None, position_ids=positions,
                              position_embeddings=rope)
        return h, (positions, rope)

    def upper(self, h: torch.Tensor, cached: tuple) -> torch.Tensor:
        """Logits (B, T, vocab) from the stream at the memory layer (experts already added)."""
        positions, rope = cached
        for layer in self.layers[self.layer + 1:]:
            h = layer.forward(h, attention_mask=None, position_ids=positions,
                              position_embeddings=rope)
        return self.model.lm_head(self.model.model.norm(h))

    # ---- whole-model helpers ----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, with the memory layer active if attached."""
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                  attention_mask=torch.ones_like(ids),
                                  pad_token_id=self.tokenizer.eos_token_id)
        return out[0, len(prompt_ids):].tolist()

    @torch.no_grad()
    def layer_states(self, texts: list[str], max_len: int = 256) -> torch.Tensor:
        """Stream at the memory layer for every token of `texts`, stacked (N, d)."""
        states = []
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt").input_ids[:, :max_len]
            h, _ = self.lower(ids)
            states.append(h[0])
        return torch.cat(states)
