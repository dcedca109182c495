"""The error model and the admin key, without a server: an app with a failing route, key files."""

from __future__ import annotations

import os

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.body_limit import BodyLimit
from server.errors import install_error_handlers
from server.memory_setup import AdminKeyError, read_admin_key_file
from server.settings import ServerSettings


def failing_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise KeyError("a bug")

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/echo")
    async def echo_nothing():
        return {}

    app.add_middleware(BodyLimit, max_bytes=2048)
    return app


def test_an_unexpected_error_is_a_500_in_openais_shape():
    client = TestClient(failing_app(), raise_server_exceptions=False)
    response = client.get("/boom")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_server_error" and "KeyError" in error["message"]
    assert error["code"] == 500


def test_undeclared_methods_are_405_in_openais_shape():
    response = TestClient(failing_app()).request("TRACE", "/echo")
    assert response.status_code == 405 and response.json()["error"]["code"] == 405
    assert response.headers["allow"] == "GET, POST"  # every route on the path, not the first


def test_body_limit_passes_small_bodies_and_refuses_large_ones():
    client = TestClient(failing_app())
    assert client.post("/echo", json={"a": "b" * 100}).json() == {"a": "b" * 100}
    response = client.post("/echo", json={"a": "b" * 4000})
    assert response.status_code == 413 and response.json()["error"]["code"] == 413


def test_admin_key_file_must_be_private_and_long_enough(tmp_path):
    path = tmp_path / "admin_key"
    path.write_text("a-good-long-key\n")
    os.chmod(path, 0o600)
    assert read_admin_key_file(path) == "a-good-long-key"
    os.chmod(path, 0o644)
    with pytest.raises(AdminKeyError, match="chmod 600"):
        read_admin_key_file(path)
    for short in ("", "  \n", "short"):
        path.write_text(short)
        os.chmod(path, 0o600)
        with pytest.raises(AdminKeyError, match="at least 8"):
            read_admin_key_file(path)


def test_short_configured_admin_keys_are_refused():
    with pytest.raises(ValueError, match="at least 8"):
        ServerSettings(admin_key="short")


def test_the_server_defaults_are_the_model_defaults(monkeypatch):
    """Memory and training defaults are written once (model/config.py): the server's
    unconfigured settings build exactly those configurations."""
    from model.config import MemoryConfig, TrainConfig

    for name in list(os.environ):
        if name.startswith("MOME_"):
            monkeypatch.delenv(name)
    settings = ServerSettings()
    assert settings.memory_config() == MemoryConfig()
    assert settings.train_config() == TrainConfig()


def test_adam_betas_are_configurable_and_reach_the_optimizer(monkeypatch):
    import torch

    from model.trainer import optimizer_for

    monkeypatch.setenv("MOME_TRAIN_ADAM_BETA1", "0.7")
    monkeypatch.setenv("MOME_TRAIN_ADAM_BETA2", "0.95")
    cfg = ServerSettings().train_config()
    optimizer = optimizer_for([torch.zeros(2, requires_grad=True)], cfg)
    assert optimizer.param_groups[0]["betas"] == (0.7, 0.95)
    monkeypatch.setenv("MOME_TRAIN_ADAM_BETA2", "1.0")  # Adam needs a decay below 1
    with pytest.raises(ValueError, match="train_adam_beta2"):
        ServerSettings()


def test_the_views_margin_and_the_training_dtype_are_configurable(monkeypatch):
    monkeypatch.setenv("MOME_TRAIN_VIEW_MARGIN", "1.5")
    monkeypatch.setenv("MOME_TRAIN_DTYPE", "bfloat16")
    cfg = ServerSettings().train_config()
    assert (cfg.view_margin, cfg.dtype) == (1.5, "bfloat16")
    monkeypatch.setenv("MOME_TRAIN_DTYPE", "float16")  # only float32 and bfloat16 are built
    with pytest.raises(ValueError, match="train_dtype"):
        ServerSettings()
    monkeypatch.setenv("MOME_TRAIN_DTYPE", "float32")
    monkeypatch.setenv("MOME_TRAIN_VIEW_MARGIN", "-1")
    with pytest.raises(ValueError, match="train_view_margin"):
        ServerSettings()
