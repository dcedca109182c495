"""The reference model: transformers' Llama in fp32 with the memory layer, for memorization.

The layers below the memory layer do not depend on the experts being trained, so their output
is computed once per batch and only the layers above run at each training step.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from model.memory_layer import MemoryLayer, TurnView, attach_memory
from model.turn_scope import AlonePrompt, alone_prompt, in_scope_rows, user_turn_marker


def right_padded(rows: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """Token rows padded on the right to one width: under causal attention the padding never
    reaches a real position, so each row's states are those it would have alone."""
    width = max(map(len, rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])


class PrefixKV:
    """The one cache method transformers' Llama attention calls (`update`): records each
    layer's keys/values of a prefix, then serves prefix + new ones without storing them."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.frozen = False

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args):
        if not self.frozen:
            self.kv[layer_idx] = (keys, values)
            return keys, values
        prefix_keys, prefix_values = self.kv[layer_idx]
        return torch.cat([prefix_keys, keys], dim=-2), torch.cat([prefix_values, values], dim=-2)

    def rows(self, rows: torch.Tensor) -> PrefixKV:
        """The same prefix for some batch rows only."""
        kv = PrefixKV()
        kv.kv = {i: (k[rows], v[rows]) for i, (k, v) in self.kv.items()}
        kv.frozen = True
        return kv


SYSTEM_TURNS_KEPT = 8


def _prefix_kv(layers, h: torch.Tensor, positions: torch.Tensor, rope: tuple) -> PrefixKV:
    """The attention keys/values of `layers` over a prefix whose input stream is h."""
    kv = PrefixKV()
    for layer in layers:
        h = layer.forward(h, attention_mask=None, position_ids=positions,
                          position_embeddings=rope, past_key_values=kv)
    kv.frozen = True
    return kv


def _after_prefix(layers, h: torch.Tensor, positions: torch.Tensor, rope: tuple,
                  prefix: PrefixKV) -> torch.Tensor:
    """`layers` over positions that follow a prefix (its keys/values in `prefix`)."""
    T = h.shape[1]
    split = int(positions[0, 0])
    # Query i (position split + i) sees keys 0 .. split + i.
    mask = torch.ones(T, split + T, dtype=torch.bool).tril(diagonal=split)[None, None]
    for layer in layers:
        h = layer.forward(h, attention_mask=mask, position_ids=positions,
                          position_embeddings=rope, past_key_values=prefix)
    return h


class UpperLayers:
    """The layers above the memory layer, the final norm and the vocabulary projection, run
    in one dtype: the split forward used by training. Inputs are cast to it and logits come
    back in float32."""

    def __init__(self, layers, norm, lm_head, dtype: torch.dtype):
        self.layers, self.norm, self.lm_head, self.dtype = layers, norm, lm_head, dtype

    def _cast(self, h: torch.Tensor, cached: tuple) -> tuple[torch.Tensor, tuple]:
        positions, rope = cached
        return h.to(self.dtype), (positions, (rope[0].to(self.dtype), rope[1].to(self.dtype)))

    def upper(self, h: torch.Tensor, cached: tuple, at: tuple | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) from the stream at the memory layer (experts already added);
        with `at` = (rows, times), only those positions' logits (N, vocab)."""
        h, (positions, rope) = self._cast(h, cached)
        for layer in self.layers:
            h = layer.forward(h, attention_mask=None, position_ids=positions,
                              position_embeddings=rope)
        return self._head(h, at)

    def _head(self, h: torch.Tensor, at: tuple | None) -> torch.Tensor:
        # The vocabulary projection is the costliest matmul per position: skip unused ones.
        return self.lm_head(self.norm(h if at is None else h[at])).float()

    @torch.no_grad()
    def upper_prefix(self, h: torch.Tensor, cached: tuple, split: int) -> PrefixKV:
        """Attention keys/values of positions [0, split) in the layers above the memory layer.

        Training only changes positions from `split` on, and with causal attention nothing
        before them changes: they run once per batch, not once per step.
        """
        h, (positions, rope) = self._cast(h, cached)
        rope_prefix = (rope[0][:, :split], rope[1][:, :split])
        return _prefix_kv(self.layers, h[:, :split], positions[:, :split], rope_prefix)

    def upper_suffix(self, h_suffix: torch.Tensor, cached: tuple, split: int,
                     prefix: PrefixKV, at: tuple | None = None) -> torch.Tensor:
        """Logits (B, T - split, vocab) of positions [split, T), attending to the cached prefix
        (with `at` = (rows, times - split): only those, (N, vocab))."""
        h, (positions, rope) = self._cast(h_suffix, cached)
        rope_suffix = (rope[0][:, split:], rope[1][:, split:])
        h = _after_prefix(self.layers, h, positions[:, split:], rope_suffix, prefix)
        return self._head(h, at)


class ReferenceModel:
    def __init__(self, model_dir: Path, layer: int, threads: int | None = None,
                 lower_only: bool = False):
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
        if lower_only:  # the serving engine's router view (model/vllm_model.py): no upper layers
            del self.layers[layer + 1:]
        self.memory: MemoryLayer | None = None
        self._hooks: list = []
        self._system_kvs: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()  # _system_kv
        self._system_lock = threading.Lock()
        self._uppers: dict[torch.dtype, UpperLayers] = {}  # upper_in
        self._uppers_lock = threading.Lock()

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def attach(self, memory: MemoryLayer) -> None:
        """Let `generate` see the memory layer (training calls it explicitly), scoped to the
        turn being answered as the serving engine scopes it."""
        for hook in self._hooks:
            hook.remove()
        self.memory = memory
        memory.turn_marker = user_turn_marker(self.tokenizer)

        def scope_of_call(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:  # each row holds the tokens its sequence adds in this call
                memory.set_scope(in_scope_rows(ids, memory.turn_marker))
                # A prefill reads its turn as if asked alone; a decode step adds one token.
                prefill = ids.shape[1] > 1 and len(memory.store)
                memory.set_view(self.turn_view(ids) if prefill else None)

        self._hooks = [self.model.register_forward_pre_hook(scope_of_call, with_kwargs=True),
                       attach_memory(self.layers[self.layer], memory)]

    # ---- the router's view of a turn that follows earlier ones (model/turn_scope.py) ----------

    def alone_prompts(self, rows: list[list[int]]) -> list[AlonePrompt | None]:
        marker, special = user_turn_marker(self.tokenizer), set(self.tokenizer.all_special_ids)
        return [alone_prompt(row, marker, special) for row in rows]

    @torch.no_grad()
    def states_alone(self, alone: list[AlonePrompt | None]) -> list[torch.Tensor | None]:
        """Per conversation, the states (turn_end - turn_start, d) at the memory layer of its
        last user turn asked alone; None where it has no earlier turn."""
        out: list[torch.Tensor | None] = [None] * len(alone)
        by_system: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(alone):
            if a is not None:
                by_system.setdefault(tuple(a.ids[:a.at]), []).append(i)
        for system, members in by_system.items():
            turns = [alone[i].ids[alone[i].at:] for i in members]
            batch = right_padded(turns, self.tokenizer.eos_token_id)
            # A conversation may open with a user turn: then nothing precedes the turn.
            h = self._lower_after(self._system_kv(system), batch) if system else self.lower(batch)[0]
            for j, (i, turn) in enumerate(zip(members, turns)):
                out[i] = h[j, :len(turn)]
        return out

    def _system_kv(self, system: tuple[int, ...]) -> PrefixKV:
        """The lower layers' keys and values of a system turn: the same for almost every
        conversation, so each alone view runs only its own turn's tokens (a third of them).
        The most recently used few are kept, per model (the server's threads share one)."""
        with self._system_lock:
            kv = self._system_kvs.get(system)
            if kv is not None:
                self._system_kvs.move_to_end(system)
                return kv
        positions, rope, h = self._positions(torch.tensor([system]))
        kv = _prefix_kv(self.layers[:self.layer + 1], h, positions, rope)
        with self._system_lock:
            self._system_kvs[system] = kv
            while len(self._system_kvs) > SYSTEM_TURNS_KEPT:
                self._system_kvs.popitem(last=False)
        return kv

    def _lower_after(self, prefix: PrefixKV, ids: torch.Tensor) -> torch.Tensor:
        """`lower` for right-padded rows (B, T) that all follow `prefix`'s tokens."""
        split = next(iter(prefix.kv.values()))[0].shape[-2]
        positions, rope, h = self._positions(ids, start=split)
        return _after_prefix(self.layers[:self.layer + 1], h, positions, rope,
                             prefix.rows(torch.zeros(len(ids), dtype=torch.long)))

    def routed(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What the router reads of a right-padded batch (B, T) whose stream is h (B, T, d):
        h, but each row's last user turn as if asked alone when earlier turns precede it."""
        rows = ids.tolist()
        alone = self.alone_prompts(rows)
        if all(a is None for a in alone):
            return h
        # A row that opens with another's alone prompt already holds its states (causal
        # attention): in a training batch, the fact's own row for its view behind a history.
        own = {b: next((c for c, row in enumerate(rows)
                        if alone[c] is None and row[:len(a.ids)] == a.ids), None)
               for b, a in enumerate(alone) if a is not None}
        turns = self.states_alone([a if own.get(b) is None else None for b, a in enumerate(alone)])
        out = h.clone()
        for b, c in own.items():
            a = alone[b]
            out[b, a.turn_start:a.turn_end] = turns[b] if c is None else h[c, a.at:len(a.ids)]
        return out

    def turn_view(self, ids: torch.Tensor) -> TurnView | None:
        """`routed` for a right-padded batch (B, T), as the memory layer takes it."""
        T = ids.shape[1]
        alone = self.alone_prompts(ids.tolist())
        parts = [(torch.arange(b * T + a.turn_start, b * T + a.turn_end), turn)
                 for b, (a, turn) in enumerate(zip(alone, self.states_alone(alone)))
                 if a is not None]
        if not parts:
            return None
        return TurnView(torch.cat([r for r, _ in parts]), torch.cat([t for _, t in parts]))

    # ---- the split forward used by training -------------------------------------------------

    def _positions(self, ids: torch.Tensor, start: int = 0):
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
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

    def upper_in(self, dtype: torch.dtype) -> UpperLayers:
        """The layers above the memory layer for training passes in `dtype`: the model's own
        in float32, else a copy made once (bfloat16 halves the weights read per step)."""
        with self._uppers_lock:
            if dtype not in self._uppers:
                head = (self.layers[self.layer + 1:], self.model.model.norm, self.model.lm_head)
                if dtype != torch.float32:
                    head = tuple(copy.deepcopy(module).to(dtype) for module in head)
                self._uppers[dtype] = UpperLayers(*head, dtype)
            return self._uppers[dtype]

    def upper(self, h: torch.Tensor, cached: tuple, at: tuple | None = None) -> torch.Tensor:
        return self.upper_in(torch.float32).upper(h, cached, at)

    def upper_prefix(self, h: torch.Tensor, cached: tuple, split: int) -> PrefixKV:
        return self.upper_in(torch.float32).upper_prefix(h, cached, split)

    def upper_suffix(self, h_suffix: torch.Tensor, cached: tuple, split: int,
                     prefix: PrefixKV, at: tuple | None = None) -> torch.Tensor:
        return self.upper_in(torch.float32).upper_suffix(h_suffix, cached, split, prefix, at)

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


class ReferenceServing:
    """The `Serving` of model/memorize.py answered by the reference model itself (tests and
    offline tools: nothing to publish, it reads the store directly)."""

    def __init__(self, ref: ReferenceModel):
        self.ref = ref

    def publish(self, version: int) -> None:
        pass

    def answers(self, facts) -> list[str]:
        return [self.ref.tokenizer.decode(self.ref.generate(f.prompt_ids, len(f.answer_ids)))
                for f in facts]
