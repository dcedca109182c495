"""Create the shared expert store once, before `mome serve` / `mome worker` open it.

With Docker Compose, every generation replica and the worker start at the same moment on one
store volume. Each of them would otherwise copy the router into a new store and create its
tables concurrently (a half-copied router or a half-filled owners table is then read by
another). Here the first container to take the lock creates the store (its router copied
in atomically); the others find it made. An existing store is left untouched.
"""

from __future__ import annotations

import fcntl
import json
import logging

from model.backbone import resolve_model_dir
from server.memory_setup import (
    default_router_dir,
    ensure_router,
    install_router,
    router_lock,
    store_dir_for,
)
from server.settings import ServerSettings

logger = logging.getLogger("mome.init_store")


def main() -> None:
    settings = ServerSettings()
    model_dir = resolve_model_dir(settings.model)
    store_dir = store_dir_for(settings, model_dir)
    if (store_dir / "config.json").exists() and (store_dir / "router" / "router.json").exists():
        return
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(store_dir.parent / f".{store_dir.name}.init-lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cfg = settings.memory_config()
        if not (store_dir / "router" / "router.json").exists():
            router_dir = default_router_dir(model_dir, cfg.layer, cfg.d_k)
            if not (router_dir / "router.json").exists():  # not the layer/d_k fitted at build
                from model.reference import ReferenceModel

                ref = ReferenceModel(model_dir, cfg.layer, threads=settings.resolved_train_threads())
                ensure_router(model_dir, ref, cfg.layer, cfg.d_k)
            with router_lock(router_dir):
                install_router(router_dir, store_dir)
            logger.info("store %s: router copied from %s", store_dir, router_dir)
        if not (store_dir / "config.json").exists():
            from model.memory_runtime import open_store

            d_model = json.loads((model_dir / "config.json").read_text())["hidden_size"]
            open_store(store_dir, cfg, d_model).close()
            logger.info("store %s created", store_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
