"""Configuration of the memory-expert layer and of memorization."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Second-key gates, each set on tuning rows to keep 90% of the rephrasings answered there
# (zsRE rows 0-59 for chat facts, CounterFact 0-499 for completions), by the router's map a
# fact's key compares through (model/relation_map.py): the chat map
# (reports/relation-bank-offline), the completion map (reports/relation-map-offline,
# `counterfact-completion`), and none for a store whose router was made before the maps
# (reports/conjunction-offline). A store made before the completion map compares its
# completion facts through the chat map.
RELATION_GATES = {"chat": {"chat": 0.455, "completion": 0.160},
                  "completion": {"completion": 0.423},  # chat facts never use this map
                  None: {"chat": 0.543, "completion": 0.178}}


@dataclass(frozen=True)
class MemoryConfig:
    # Decoder layer whose output is both routed and edited: the mid-depth site where factual
    # recall happens in ROME/MEMIT's studies (layer 10 of SmolLM2-135M's 30).
    layer: int = 10
    d_k: int = 256  # routing key width: whitened principal components of the hidden state
    top_k: int = 4  # experts looked up per token
    # Similarity gate: an expert contributes only when cos(query, key) reaches it; below it the
    # contribution is exactly zero, which is what keeps unrelated prompts unchanged.
    gate: float = 0.93
    # Each expert's own threshold (>= gate, carried in its key's norm, see expert_gates.py)
    # rises to this much above its nearest other locus, so close facts do not fire each other.
    gate_separation: float = 0.02
    max_threshold: float = 0.98
    # How experts are searched per token (expert_store/config.py IndexConfig): "auto" searches
    # exactly below 100,000 experts and an IVF index above (bench/gate_recall.py measures
    # that it finds the pairs above the gate that exact search finds). 16 probes found every
    # pair 32 did at 1M experts and served 0.94 of the plain server against 0.90 (c=32,
    # reports/serve-1m-nprobe.json).
    index: str = "auto"
    index_nprobe: int = 16
    # A fact's second key (model/relation_key.py): its expert adds its value only where the
    # request's words outside the subject match the fact's question's, at cosine at least
    # this (0: no second key; None: the gate tuned for the store's router, RELATION_GATES).
    relation_gate_chat: float | None = None
    relation_gate_completion: float | None = None

    def relation_gate(self, kind: str, through: str | None) -> float:
        """The second-key gate of a new `kind` fact whose key compares through the router's
        `through` map ("chat", "completion", or None: a router without maps)."""
        chosen = self.relation_gate_chat if kind == "chat" else self.relation_gate_completion
        return RELATION_GATES[through][kind] if chosen is None else chosen

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    # Adam's step size on the experts' values: 3.0 trains CounterFact facts 16% faster than
    # 1.5 with the same reliability, locality and perplexity (reports/METHODS.md).
    lr: float = 3.0
    # Adam's moment decays. PyTorch's (0.9, 0.999) average over more steps than a fact
    # trains for (about 6 for a completion, 12 for a chat fact); shorter memories follow
    # the last few steps: 15% fewer steps per chat fact and 10% per completion on 200
    # facts each that the betas were not chosen on, with no rephrasing, near miss or later-turn
    # figure lower (reports/METHODS.md).
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    max_steps: int = 60
    # Train until every answer token beats the runner-up logit by this much: fp32 training and
    # the serving kernels round differently, and a bare argmax can flip when served.
    margin: float = 3.0
    # A view (the fact behind an exchange, in other words) is trained until every answer
    # token leads the runner-up by more than this. Past the bare boundary of the contexts it
    # was trained in, the value carries to more it was not: 200 held-out zsRE facts asked
    # after an unrelated exchange 0.955 -> 0.975 at 3.0 (0 before), nothing else changed,
    # 6% more steps (chosen on tuning rows 0-29; rows 600-799, with the changes before it:
    # 0.915 -> 0.930, reports/METHODS.md).
    view_margin: float = 3.0
    max_attempts: int = 3  # rounds of (train, commit, verify through the engine)
    # The fact is also trained behind these many unrelated context sentences (where its
    # expert still fires), so the value works in more contexts than the one posted.
    context_views: int = 0
    # Chat facts are also trained asked after this many earlier exchanges (facts.py), so they
    # are answered later in a conversation too. The second, a numbered reply the backbone
    # wrote itself, keeps answers from copying an earlier reply's form: on 199 zsRE facts
    # (rows 600-799, whose misses suggested it) asked after an unrelated exchange 0.930 ->
    # 0.970 (+9, -1 prompts), nothing else moved beyond noise, 24% more time per fact
    # (10% on the tuning rows it was chosen on; reports/METHODS.md).
    history_views: int = 2
    # Chat facts are also trained asked in up to this many other wordings of their relation
    # (model/rewordings.py), so that users' own wordings of the question are answered too.
    reworded_views: int = 3
    # A completion fact's key: leaned toward its locus's mean query behind the context
    # prefixes (facts.py), as ROME keys average over prefixes. Rephrasings often open with
    # other text; offline, on CounterFact rows 0-199, keys then fired on 129 of 200
    # rephrasings instead of 106 (floor 0.98), on no more locality or other facts' prompts;
    # held out, rows 500-699: rephrasings 0.155 -> 0.185, other relation kept 0.560 -> 0.545
    # (reports/METHODS.md).
    key_behind_prefixes: bool = True
    # Views (history_views, context_views) join the training only once the facts clear
    # alone: chat facts train 15-30% faster, but rephrasings were answered less often
    # (0.767 against 0.833 on 60 held-out zsRE facts, reports/METHODS.md), so it is off.
    views_after_facts: bool = False
    # The precision of the layers above the memory layer during training steps
    # ("float32" or "bfloat16"). In bfloat16 a step reads half the weights (about a third
    # faster at chat facts' batch shapes on this CPU, reports/METHODS.md); values that clear
    # there are checked in float32, as served, and trained on in float32 where they fall short.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be float32 or bfloat16, not {self.dtype!r}")
