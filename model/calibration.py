"""Calibration corpus for the router: text the backbone writes itself from varied openings.

Nothing is downloaded and nothing is borrowed from evaluation data: the router's statistics
come from the backbone's own distribution, in plain and chat-formatted contexts.
"""

from __future__ import annotations

import torch

from model.reference import ReferenceModel

OPENINGS = [
    "The history of", "In the village of", "Scientists have discovered that", "The capital of",
    "My favourite recipe is", "The football club", "She was born in", "The river flows",
    "The company announced", "During the war,", "The novel tells the story of",
    "The language spoken in", "He played the", "The album was released", "The city of",
    "In mathematics,", "The museum holds", "The president of", "The mountain is located",
    "The university was founded", "The painter", "The actor", "The team won", "The bridge",
]
QUESTIONS = [
    "Who wrote Hamlet?", "What is photosynthesis?", "Where is Mount Kilimanjaro?",
    "Tell me about the Roman Empire.", "What language do people speak in Brazil?",
    "Who was Marie Curie?", "How does a car engine work?", "What is the capital of Japan?",
    "Name a famous jazz musician.", "Which team won the World Cup in 2010?",
    "What is the tallest building in the world?", "Who painted the Mona Lisa?",
    "Where was Albert Einstein born?", "What does a cardiologist do?",
    "Which company makes the iPhone?", "What is the official religion of Thailand?",
]


@torch.no_grad()
def self_generated_corpus(reference: ReferenceModel, new_tokens: int = 64, seed: int = 0,
                          batch: int = 20) -> list[str]:
    tok = reference.tokenizer
    prompts = list(OPENINGS) + [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                add_generation_prompt=True) for q in QUESTIONS
    ]
    torch.manual_seed(seed)
    tok.padding_side = "left"
    texts = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
        out = reference.model.generate(**enc, max_new_tokens=new_tokens, do_sample=True,
                                       temperature=0.9, top_p=0.95,
                                       pad_token_id=tok.eos_token_id)
        for row, mask in zip(out, enc.attention_mask):
            start = int((mask == 0).sum())  # left pads
            texts.append(tok.decode(row[start:], skip_special_tokens=False))
    tok.padding_side = "right"
    return texts


def fit_router(reference: ReferenceModel, d_k: int, seeds: tuple[int, ...] = (0, 1)):
    """Fit the whitening router on the backbone's own text (about 8k token states)."""
    from model.router import Router

    texts = [t for seed in seeds for t in self_generated_corpus(reference, 96, seed)]
    return Router.fit(reference.layer_states(texts), d_k), len(texts)
