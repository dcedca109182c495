"""Start-up of the memory side: router, store, registry, reference model, memorizer."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from expert_store.registry import open_registry
from model.backbone import mome_home
from model.calibration import fit_router
from model.memorize import Memorizer
from model.memory_runtime import load_memory
from model.reference import ReferenceModel
from model.relation_map import (
    COMPLETION_ROWS,
    fit_relation_map,
    prompt_means,
    question_means,
    read_rows,
)
from model.router import Router
from server.settings import MIN_ADMIN_KEY_LEN, ServerSettings

logger = logging.getLogger(__name__)


def default_router_dir(model_dir: Path, layer: int, d_k: int) -> Path:
    return mome_home() / "routers" / f"{model_dir.name}-L{layer}-d{d_k}"


def ensure_router(model_dir: Path, ref: ReferenceModel, layer: int, d_k: int,
                  force: bool = False) -> Path:
    """Fit the router once per (backbone, layer, d_k), on the backbone's own text, and its
    relation maps (a router fitted before a map gets it here; stores keep their copies).
    One process at a time: the API process and a worker may start together on a new
    machine, and two fits saved over each other would not match their fingerprint."""
    target = default_router_dir(model_dir, layer, d_k)
    if not force and _complete(target):
        return target  # nothing to write: a read-only MOME_HOME serves too
    with router_lock(target):
        _fit_missing(target, model_dir, ref, layer, d_k, force)
    return target


def _complete(router_dir: Path) -> bool:
    if not (router_dir / "router.json").exists():
        return False
    router = Router.load(router_dir)
    return router.relation is not None and router.completion_relation is not None


@contextmanager
def router_lock(router_dir: Path):
    """Held while a router directory is written or copied (flock, across processes)."""
    router_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(router_dir.parent / f"{router_dir.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def install_router(router_dir: Path, store_dir: Path) -> None:
    """Copy a router into a store whole: staged, then renamed into place, so no process
    reads a half-copied one."""
    store_dir.mkdir(parents=True, exist_ok=True)
    staged = store_dir / ".router.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(router_dir, staged)
    shutil.rmtree(store_dir / "router", ignore_errors=True)  # a copy cut short
    os.replace(staged, store_dir / "router")


def _fit_missing(target: Path, model_dir: Path, ref: ReferenceModel, layer: int, d_k: int,
                 force: bool) -> None:
    if force or not (target / "router.json").exists():
        logger.info("fitting the router (layer %d, d_k %d) on self-generated text", layer, d_k)
        router, n_texts = fit_router(ref, d_k)
        router.save(target, {"model": str(model_dir), "layer": layer, "d_k": d_k,
                             "calibration_texts": n_texts})
    router = Router.load(target)
    chat, completion = router.relation, router.completion_relation
    if chat is None:  # fitted before the maps existed, or just now
        logger.info("fitting the chat relation map of second keys (model/relation_map.py)")
        chat = fit_relation_map(lambda questions: question_means(ref, router, questions))
    if completion is None:
        logger.info("fitting the completion relation map of second keys (model/relation_map.py)")
        completion = fit_relation_map(lambda prompts: prompt_means(ref, router, prompts),
                                      read_rows(COMPLETION_ROWS))
    if chat is not router.relation or completion is not router.completion_relation:
        meta = json.loads((target / "router.json").read_text())
        router.with_relation(chat, completion).save(
            target, {**meta, "relation_map": True, "completion_relation_map": True})


def store_dir_for(settings: ServerSettings, model_dir: Path) -> Path:
    return Path(settings.store_dir) if settings.store_dir else mome_home() / "stores" / model_dir.name


def prepare_store(settings: ServerSettings, model_dir: Path, ref: ReferenceModel) -> Path:
    """The store directory, with the router it was created with (frozen for its lifetime)."""
    cfg = settings.memory_config()
    store_dir = store_dir_for(settings, model_dir)
    if not (store_dir / "router" / "router.json").exists():
        router_dir = ensure_router(model_dir, ref, cfg.layer, cfg.d_k)
        with router_lock(router_dir):  # another process may be installing it too
            if not (store_dir / "router" / "router.json").exists():
                install_router(router_dir, store_dir)
    return store_dir


def build_memorizer(settings: ServerSettings, model_dir: Path) -> tuple[Memorizer, dict, object]:
    """The reference model with the memory layer, the engine's `mome` overrides, the registry."""
    cfg = settings.memory_config()
    ref = ReferenceModel(model_dir, cfg.layer, threads=settings.resolved_train_threads())
    store_dir = prepare_store(settings, model_dir, ref)
    memory = load_memory(store_dir, store_dir / "router", cfg, ref.d_model)
    ref.attach(memory)
    registry = open_registry(str(store_dir), settings.redis_url,
                             settings.job_retention_s or None)
    overrides = {"store_dir": str(store_dir), "router_dir": str(store_dir / "router"),
                 "memory": cfg.to_dict(),
                 "turn_marker": list(memory.turn_marker) if memory.turn_marker else None}
    return Memorizer(ref, memory, settings.train_config()), overrides, registry


class AdminKeyError(RuntimeError):
    """The admin key file cannot be trusted: the server refuses to start."""


def admin_key(settings: ServerSettings) -> str:
    """The configured key, or a generated one saved where the local CLI looks for it."""
    if settings.admin_key:
        return settings.admin_key
    path = mome_home() / "admin_key"
    if path.exists():
        return read_admin_key_file(path)
    key = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    logger.info("no MOME_ADMIN_KEY set: generated one in %s", path)
    return key


def read_admin_key_file(path: Path) -> str:
    """A key file readable by its owner only, holding a key of at least 8 characters."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AdminKeyError(f"{path} is readable by others (mode {mode:o}): "
                            f"chmod 600 {path}, or set MOME_ADMIN_KEY")
    key = path.read_text().strip()
    if len(key) < MIN_ADMIN_KEY_LEN:
        raise AdminKeyError(f"{path} holds a key of {len(key)} characters; at least "
                            f"{MIN_ADMIN_KEY_LEN} are needed (delete it to generate one)")
    return key
