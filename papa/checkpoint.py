"""Atomic checkpoint files and safe loading.

`atomic_save` writes to a temporary file in the same directory, fsyncs it and renames it over the target, so a crash
never leaves a half-written checkpoint under the real name. `load` uses `weights_only=True` (no arbitrary code from a
file) and strips the `module.` prefix that DDP-wrapped reference checkpoints carry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or of the wrong kind."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; a checkpoint or image should be as readable as any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj: Any, path: str | Path) -> None:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


WEIGHTS = ("auto", "policy", "ema")


def _select(obj: Any, path: str | Path, weights: str) -> tuple[str, Any]:
    """The one rule for which weights a loaded checkpoint object gives: ('ema' | 'policy', …) from a trainer round
    checkpoint, ('model', …) from a shipped or bare one."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if not isinstance(obj, dict):
        return "model", obj
    if weights == "ema" and "ema" not in obj:
        raise CheckpointError(f"checkpoint '{path}' holds no EMA weights (the run had train.ema_decay 0); "
                              f"use --weights policy")
    if weights != "policy" and isinstance(obj.get("ema"), dict):
        return "ema", obj["ema"]
    if "state_dict" in obj or "model" not in obj:
        return "model", obj.get("state_dict", obj)
    return "policy", obj["model"]


def resolved_weights(path: str | Path, weights: str = "auto") -> str:
    """Which weights `load_state_dict(path, weights)` takes: 'ema' or 'policy' from a round checkpoint, else 'model'."""
    return _select(load(path), path, weights)[0]


def load_state_dict(path: str | Path, weights: str = "auto") -> dict[str, torch.Tensor]:
    """A shipped papa checkpoint ({'state_dict': …}), a trainer round checkpoint ({'model': …, 'ema': …}) or a bare
    reference state dict; `module.` prefixes stripped, floating tensors cast to float32. `weights` picks from a round
    checkpoint: 'policy' the trained model, 'ema' its moving average (train.ema_decay > 0), 'auto' the EMA where the
    run kept one (the model its evaluations judged), else the policy."""
    sd = _select(load(path), path, weights)[1]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint '{path}' holds no state dict")
    return {k: v.float() if v.is_floating_point() else v for k, v in strip_module_prefix(sd).items()}


def save_fp16_with_sidecar(state_dict: dict, extra: dict, path: str | Path, kind: str, command: str,
                           meta: dict) -> dict:
    """Save a shipped model: floating tensors in fp16 (atomically) and a JSON sidecar beside it (`.json`) with its
    file, sha256, kind, the command that made it and `meta` (config, data digest, steps, figures). Returns the sidecar."""
    import json
    path = Path(path)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    atomic_save({"state_dict": sd, **extra}, path)
    side = {"file": str(path), "sha256": sha256_file(path), "kind": kind, "command": command, **meta,
            "torch": torch.__version__}
    atomic_write_text(path.with_suffix(".json"), json.dumps(side, indent=2))
    return side
