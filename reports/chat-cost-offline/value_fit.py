"""How predictable a chat fact's trained value is from its answer (and its question), offline.

    python reports/chat-cost-offline/value_fit.py STORE_DIR

STORE_DIR: a finished run's store (e.g. a `mome eval --embedded` report's store/). Fits a
ridge regression from answer embeddings (and the layer-10 state at the prompt's last token,
the assistant header) to the
values on the first half of the chat facts and prints cosine and R^2 on the second half
(reports/METHODS.md, "A chat fact's trained value, predicted from its answer").
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.backbone import resolve_model_dir  # noqa: E402
from model.config import MemoryConfig  # noqa: E402
from model.facts import encode_fact  # noqa: E402
from model.reference import ReferenceModel  # noqa: E402


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    store = sys.argv[1]
    con = sqlite3.connect(f"file:{store}/registry.sqlite3?mode=ro", uri=True)
    facts = [json.loads(b) for (b,) in con.execute("select body from facts")]
    facts = [f for f in facts if f["status"] == "memorized" and f["kind"] == "chat"]
    ref = ReferenceModel(resolve_model_dir(None), MemoryConfig().layer, threads=1)
    tok, d = ref.tokenizer, ref.model.config.hidden_size
    values = np.fromfile(f"{store}/values.float32", dtype=np.float32).reshape(-1, d)
    V = np.stack([values[f["expert_ids"][0]] for f in facts])
    E = ref.model.get_input_embeddings().weight.detach().numpy()
    first, mean, state = [], [], []
    for f in facts:
        ids = tok(f["payload"]["answer"], add_special_tokens=False).input_ids
        first.append(E[ids[0]])
        mean.append(E[ids].mean(0))
        enc = encode_fact(tok, {"question": f["payload"]["question"], "answer": "-"}, 512)
        with torch.no_grad():
            h, _ = ref.lower(torch.tensor([enc.prompt_ids]))
        state.append(h[0, -1].numpy())
    first, mean, state = map(np.stack, (first, mean, state))
    norms = np.linalg.norm(V, axis=1)
    print(f"{len(facts)} facts; |v| mean {norms.mean():.2f} sd {norms.std():.2f}")
    print(f"cos(v, first answer embedding) {cos(V, first).mean():.3f}; cos(v, mean answer "
          f"embedding) {cos(V, mean).mean():.3f}; cos(v, prompt's last state) "
          f"{cos(V, state).mean():.3f}; cos(v, mean v) {cos(V, V.mean(0)[None]).mean():.3f}")
    n = len(V) // 2
    mean_only = cos(np.broadcast_to(V[:n].mean(0), V[n:].shape), V[n:]).mean()
    print(f"the first half's mean value alone: held-out cos {mean_only:.3f}")
    features = [("first", first), ("mean", mean), ("first+state", np.hstack([first, state]))]
    for name, X in features:
        for lam in (1e-2, 1e-1, 1, 10):
            mu_x, mu_v = X[:n].mean(0), V[:n].mean(0)
            Xc = X[:n] - mu_x
            W = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (V[:n] - mu_v))
            P = (X[n:] - mu_x) @ W + mu_v
            r2 = 1 - ((V[n:] - P) ** 2).sum() / ((V[n:] - V[n:].mean(0)) ** 2).sum()
            print(f"{name:12s} ridge {lam:g}: held-out cos {cos(P, V[n:]).mean():.3f}, R2 {r2:.3f}")


if __name__ == "__main__":
    main()
