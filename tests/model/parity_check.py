"""Child process of the parity test: memorize facts in the reference model, then generate
greedily with both implementations of the memory layer and print the outputs as JSON.

Run as a script (vLLM starts its engine in a subprocess and needs the __main__ guard).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch


def fired_owners(ref, memory, ids: list[int]) -> list[int]:
    """Owners of the experts that fire on `ids` (a prompt and its output), as served: in the
    turn being answered, its words read as if asked alone."""
    from model.turn_scope import in_scope_rows

    batch = torch.tensor([ids])
    h, _ = ref.lower(batch)
    _, I = memory.route(ref.routed(batch, h)[0])
    scope = in_scope_rows(batch, memory.turn_marker)
    if scope is not None:
        I[~scope[0].numpy()] = -1
    fired = I[I >= 0]
    return sorted(set(memory.store.owner_of(np.unique(fired)).tolist())) if len(fired) else []


if __name__ == "__main__":
    workdir = Path(sys.argv[1])
    from model.backbone import pull_default_model
    from model.config import MemoryConfig, TrainConfig
    from model.facts import encode_fact
    from model.fired_log import FIRED_KEY, PROMPT_KEY, prompt_cache_key
    from model.memorize import Memorizer
    from model.memory_runtime import load_memory
    from model.reference import ReferenceModel, ReferenceServing
    from server.memory_setup import ensure_router

    cfg = MemoryConfig()
    model_dir = pull_default_model()
    ref = ReferenceModel(model_dir, cfg.layer)
    shutil.copytree(ensure_router(model_dir, ref, cfg.layer, cfg.d_k), workdir / "router")
    memory = load_memory(workdir / "store", workdir / "router", cfg, ref.d_model)
    ref.attach(memory)
    rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()[400:408]]
    facts = [encode_fact(ref.tokenizer, {"prompt": r["prompt"], "completion": r["target_new"],
                                         "subject": r["subject"]}, 512) for r in rows]
    chat = encode_fact(ref.tokenizer, {"question": "Who designed the Orvel bridge?",
                                       "answer": "It was designed by Tamsin Achebe."}, 512)
    Memorizer(ref, memory, TrainConfig()).memorize(
        list(range(1, 10)), facts + [chat], ReferenceServing(ref))
    memory.store.checkpoint()
    # The chat fact asked after an unrelated exchange: the router reads its turn as if
    # asked alone, in both implementations.
    later = encode_fact(ref.tokenizer, {"messages": [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Who designed the Orvel bridge?"}], "answer": "-"}, 512)
    prompts = ([f.prompt_ids for f in facts] + [chat.prompt_ids]
               + [ref.tokenizer(r["locality_prompt"]).input_ids for r in rows]
               + [ref.tokenizer("The capital of France is").input_ids, later.prompt_ids])
    reference_ids = [list(ref.generate(p, 12)) for p in prompts]

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=1 << 29,
              hf_overrides={"architectures": ["MomeLlamaForCausalLM"],
                            "mome": {"store_dir": str(workdir / "store"),
                                     "router_dir": str(workdir / "router"),
                                     "memory": cfg.to_dict(),
                                     "turn_marker": list(memory.turn_marker)}},
              worker_extension_cls="model.vllm_model.MomeWorkerExtension")
    versions = llm.collective_rpc("mome_refresh")
    llm.collective_rpc("mome_bind")

    def tagged(key: str) -> SamplingParams:  # recorded in the engine's fired log
        return SamplingParams(temperature=0, max_tokens=12, extra_args={FIRED_KEY: key})

    def take(key: str, before: int | None = None) -> dict:
        return llm.collective_rpc("mome_take_fired", args=(key, before))[0]

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [tagged(f"p{i}") for i in range(len(prompts))], use_tqdm=False)
    # As the server asks: what fired before the last output token's position.
    fired = [take(f"p{i}", len(p) + len(o.outputs[0].token_ids) - 1)
             for i, (p, o) in enumerate(zip(prompts, outs))]
    # Past the first KV block (128 tokens on CPU), asked twice: the second is served from
    # the prefix cache, which the fired log must flag (the server then recomputes the prompt).
    long_prompt = ref.tokenizer(" ".join(["The weather was mild that week."] * 30)).input_ids \
        + facts[0].prompt_ids
    cached = []
    for key in ("long-1", "long-2"):
        llm.generate([{"prompt_token_ids": long_prompt}], tagged(key), use_tqdm=False)
        cached.append(take(key))
    # Asked as the server asks, with the prompt's cache key (a salt of its own, so the first
    # computes it whole): the second takes the cached blocks' firings from the first.
    # The fact comes first, so it fires in the blocks the cache serves.
    fact_first = facts[0].prompt_ids + long_prompt[:-len(facts[0].prompt_ids)]
    keyed, keyed_cached, prompt_key = [], [], prompt_cache_key("keyed", fact_first)
    for key in ("keyed-1", "keyed-2"):
        params = tagged(key)
        params.extra_args[PROMPT_KEY] = prompt_key
        out = llm.generate([{"prompt_token_ids": fact_first, "cache_salt": "keyed"}], params,
                           use_tqdm=False)[0]
        keyed.append(take(key))
        keyed_cached.append(out.num_cached_tokens or 0)
    print("PARITY " + json.dumps({
        "versions": versions, "store_version": memory.store.version,
        "n_memorized": 9, "reference": reference_ids,
        # Token ids, not text: 12 tokens may end inside a UTF-8 character, which the
        # reference decodes as U+FFFD and vLLM's incremental detokenizer holds back.
        "vllm": [list(o.outputs[0].token_ids) for o in outs],
        "vllm_text": [o.outputs[0].text for o in outs],
        "answers": [f.answer_text for f in facts] + [chat.answer_text],
        "fired": fired, "cached": cached, "keyed": keyed, "keyed_cached": keyed_cached,
        # The oracle: the lower layers and the router over each prompt and its output less
        # the last token (never forwarded), with the reference model.
        "fired_oracle": [fired_owners(ref, memory, p + list(o.outputs[0].token_ids)[:-1])
                         for p, o in zip(prompts, outs)],
        "later_chat_owner": 9,
        "owners": sorted(set(memory.store.owner_of(np.arange(memory.store.high_water))
                             .tolist())),
        "long_oracle": fired_owners(ref, memory, long_prompt),
        "fact_first_oracle": fired_owners(ref, memory, fact_first),
        "fact_first_head_oracle": fired_owners(ref, memory, fact_first[:128])}))
