"""The frozen router: a whitening projection of hidden states into the key space.

Raw mid-layer hidden states share a large common direction (unrelated prompts have high
cosine similarity). Centring and whitening on a calibration corpus makes cosine similarity
between queries meaningful; keeping the top `d_k` principal directions makes keys compact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The relation maps a router may hold, by the index a store keeps per expert
# (expert_store/store.py `relation_maps`): which one its second key compares through.
CHAT_MAP, COMPLETION_MAP = 0, 1


class Router(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, projection: torch.Tensor,
                 relation: torch.Tensor | None = None,
                 completion_relation: torch.Tensor | None = None):
        super().__init__()
        assert mean.ndim == 1 and projection.shape[1] == mean.shape[0]
        assert relation is not None or completion_relation is None, "the chat map comes first"
        self.register_buffer("mean", mean.float())  # (d_model,)
        self.register_buffer("projection", projection.float().contiguous())  # (d_k, d_model)
        # The learned maps second keys compare relation means through (model/relation_map.py):
        # `relation` trained on chat questions, `completion_relation` on completion prompts.
        # None (routers made before them): the identity, or the chat map for completions.
        self.register_buffer("relation", self._checked_map(relation))  # (d_k, d_k) or None
        self.register_buffer("completion_relation", self._checked_map(completion_relation))

    def _checked_map(self, relation: torch.Tensor | None) -> torch.Tensor | None:
        if relation is None:
            return None
        assert relation.shape == (self.d_k, self.d_k), f"a relation map is (d_k, d_k): {relation.shape}"
        return relation.float().contiguous()

    @property
    def d_k(self) -> int:
        return self.projection.shape[0]

    def whiten(self, h: torch.Tensor) -> torch.Tensor:
        """Raw queries (..., d_k) from hidden states (..., d_model), before normalization."""
        return (h.float() - self.mean) @ self.projection.T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Unit-norm queries (T, d_k) from hidden states (T, d_model)."""
        return torch.nn.functional.normalize(self.whiten(h), dim=-1)

    def map_for(self, kind: str) -> int:
        """The map a new `kind` fact's second key compares through (CHAT_MAP, COMPLETION_MAP)."""
        return COMPLETION_MAP if kind == "completion" and self.completion_relation is not None \
            else CHAT_MAP

    def map_name(self, index: int) -> str | None:
        """"chat", "completion", or None where the map is the identity (a router without maps)."""
        if index == COMPLETION_MAP:
            assert self.completion_relation is not None, "this router has no completion map"
            return "completion"
        return None if self.relation is None else "chat"

    def relation_view(self, means: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """Relation means (n, d_k) as second keys compare them: mapped, unit norm. `maps` (n,):
        each row's map (CHAT_MAP where None)."""
        means = means.float()
        completion = None
        if maps is not None:
            maps = torch.as_tensor(maps, device=means.device)
            assert means.ndim == 2 and maps.shape == (len(means),), "one map per row of means"
            completion = maps == COMPLETION_MAP
            # A key taken through a map this router lacks would be compared at a gate tuned
            # for another (load_memory refuses such a store; checked here only without it).
            assert self.completion_relation is not None or not completion.any(), \
                "a second key was taken through a completion map this router does not have"
        if self.relation is not None:
            viewed = means @ self.relation.T
            if self.completion_relation is not None and completion is not None:
                viewed[completion] = means[completion] @ self.completion_relation.T
            means = viewed
        return torch.nn.functional.normalize(means, dim=-1)

    def with_relation(self, relation: torch.Tensor,
                      completion_relation: torch.Tensor | None = None) -> Router:
        return Router(self.mean, self.projection, relation, completion_relation)

    @classmethod
    def fit(cls, hidden: torch.Tensor, d_k: int, eps: float = 1e-3) -> Router:
        """PCA-whitening fitted on calibration hidden states (N, d_model)."""
        hidden = hidden.double()
        mean = hidden.mean(0)
        cov = torch.cov((hidden - mean).T)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        top = torch.argsort(eigvals, descending=True)[:d_k]
        scale = (eigvals[top].clamp_min(0) + eps * eigvals.max()).rsqrt()
        projection = scale[:, None] * eigvecs[:, top].T
        return cls(mean.float(), projection.float())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.mean.numpy().tobytes())
        digest.update(self.projection.numpy().tobytes())
        for relation in (self.relation, self.completion_relation):
            if relation is not None:
                digest.update(relation.numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: Path, meta: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "router.safetensors.tmp"
        tensors = {"mean": self.mean, "projection": self.projection}
        for name in ("relation", "completion_relation"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        save_file(tensors, str(tmp))
        tmp.replace(path / "router.safetensors")
        (path / "router.json").write_text(json.dumps({**meta, "fingerprint": self.fingerprint()},
                                                     indent=2))

    @classmethod
    def load(cls, path: Path) -> Router:
        tensors = load_file(str(path / "router.safetensors"))
        router = cls(tensors["mean"], tensors["projection"], tensors.get("relation"),
                     tensors.get("completion_relation"))
        expected = json.loads((path / "router.json").read_text())["fingerprint"]
        if router.fingerprint() != expected:
            raise ValueError(f"router at {path} does not match its fingerprint")
        return router
