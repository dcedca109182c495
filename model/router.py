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


class Router(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, projection: torch.Tensor,
                 relation: torch.Tensor | None = None):
        super().__init__()
        assert mean.ndim == 1 and projection.shape[1] == mean.shape[0]
        self.register_buffer("mean", mean.float())  # (d_model,)
        self.register_buffer("projection", projection.float().contiguous())  # (d_k, d_model)
        # The learned map second keys compare relation means through (model/relation_map.py);
        # None (routers made before it): the identity.
        if relation is not None:
            assert relation.shape == (projection.shape[0], projection.shape[0])
            relation = relation.float().contiguous()
        self.register_buffer("relation", relation)  # (d_k, d_k) or None

    @property
    def d_k(self) -> int:
        return self.projection.shape[0]

    def whiten(self, h: torch.Tensor) -> torch.Tensor:
        """Raw queries (..., d_k) from hidden states (..., d_model), before normalization."""
        return (h.float() - self.mean) @ self.projection.T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Unit-norm queries (T, d_k) from hidden states (T, d_model)."""
        return torch.nn.functional.normalize(self.whiten(h), dim=-1)

    def relation_view(self, means: torch.Tensor) -> torch.Tensor:
        """Relation means (..., d_k) as second keys compare them: mapped, unit norm."""
        if self.relation is not None:
            means = means.float() @ self.relation.T
        return torch.nn.functional.normalize(means, dim=-1)

    def with_relation(self, relation: torch.Tensor) -> Router:
        return Router(self.mean, self.projection, relation)

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
        if self.relation is not None:
            digest.update(self.relation.numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: Path, meta: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "router.safetensors.tmp"
        tensors = {"mean": self.mean, "projection": self.projection}
        if self.relation is not None:
            tensors["relation"] = self.relation
        save_file(tensors, str(tmp))
        tmp.replace(path / "router.safetensors")
        (path / "router.json").write_text(json.dumps({**meta, "fingerprint": self.fingerprint()},
                                                     indent=2))

    @classmethod
    def load(cls, path: Path) -> Router:
        tensors = load_file(str(path / "router.safetensors"))
        router = cls(tensors["mean"], tensors["projection"], tensors.get("relation"))
        expected = json.loads((path / "router.json").read_text())["fingerprint"]
        if router.fingerprint() != expected:
            raise ValueError(f"router at {path} does not match its fingerprint")
        return router
