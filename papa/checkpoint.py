"""Atomic checkpoint files and safe loading.

`atomic_save` writes to a temporary file in the same directory, fsyncs it and renames it over the target, so a crash
never leaves a half-written checkpoint under the real name. `load` uses `weights_only=True` (no arbitrary code from a
file) and strips the `module.` prefix that DDP-wrapped reference checkpoints carry.
"""
from __future__ import annotations

import hashlib
import os
import re
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
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once the directory entry is on disk


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the file itself is already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMP_GLOB = ".*.tmp"  # what atomic_write_bytes names its temporary files


def remove_stale_temps(d: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left behind in `d` (call only while holding the directory's lock)."""
    gone = []
    for p in Path(d).glob(TEMP_GLOB):
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


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
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"checkpoint '{path}' holds objects other than tensors and plain containers; papa "
                                  "refuses to unpickle it (it could run code). Use a checkpoint papa wrote, or "
                                  "re-save the state dict alone with torch.save") from None
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


# --------------------------------------------------------------------------- trainer round checkpoints

ROUND_FILE = re.compile(r"round_(\d+)\.pt")


def round_files(d: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of every round checkpoint in `d`, in round order: numeric, so round_1000 follows round_999."""
    found = [(int(m.group(1)), p) for p in Path(d).glob("round_*.pt") if (m := ROUND_FILE.fullmatch(p.name))]
    return sorted(found)


def prune_rounds(d: str | Path, latest: int) -> None:
    """Keep round `latest` and the newest one before it (the last good), by round number: a text sort would put
    round_1000 before round_999 and delete the new checkpoint. Files of later rounds are left alone."""
    earlier = [p for n, p in round_files(d) if n < latest]
    for old in earlier[:-1]:
        old.unlink(missing_ok=True)


# key: (type, what it must be) of a trainer round checkpoint; `check_round` is the one place that judges one
ROUND_KEYS = {"model": dict, "opt": dict, "round": int, "history": list, "metrics": list, "elapsed": (int, float),
              "config_hash": str, "torch_rng": torch.Tensor}


def check_round(obj: Any, path: str | Path, expect_round: int | None = None) -> dict:
    """Raise CheckpointError unless `obj` has the structure of a trainer round checkpoint (and, given, its round)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' is a {type(obj).__name__}, not a papa round checkpoint")
    for key, tp in ROUND_KEYS.items():
        if key not in obj:
            raise CheckpointError(f"checkpoint '{path}' has no '{key}'; it is not a complete papa round checkpoint")
        if not isinstance(obj[key], tp) or isinstance(obj[key], bool):
            raise CheckpointError(f"checkpoint '{path}': '{key}' is a {type(obj[key]).__name__}, not what papa writes")
    if not all(isinstance(v, torch.Tensor) for v in obj["model"].values()):
        raise CheckpointError(f"checkpoint '{path}': 'model' is not a state dict of tensors")
    if "ema" in obj and not (isinstance(obj["ema"], dict) and all(isinstance(v, torch.Tensor) for v in obj["ema"].values())):
        raise CheckpointError(f"checkpoint '{path}': 'ema' is not a state dict of tensors")
    if expect_round is not None and obj["round"] != expect_round:
        raise CheckpointError(f"checkpoint '{path}' says round {obj['round']}, its name round {expect_round}")
    if len(obj["metrics"]) != obj["round"] + 1:
        raise CheckpointError(f"checkpoint '{path}' holds {len(obj['metrics'])} metric rows for round {obj['round']}")
    for part in ("model", "ema"):
        bad = [k for k, v in obj.get(part, {}).items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"checkpoint '{path}': {part} weights are not finite (e.g. '{bad[0]}')")
    return obj


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


def dataset_of(path: str | Path, obj: Any = None) -> str | None:
    """The dataset a checkpoint was trained on, where it says: a round checkpoint's 'dataset', a shipped file's JSON
    sidecar, or the config.yaml of the run directory holding it; None when nothing says (a bare reference file)."""
    import json
    path = Path(path)
    if isinstance(obj, dict) and isinstance(obj.get("dataset"), str):
        return obj["dataset"]
    for meta, get in ((path.with_suffix(".json"), lambda m: m["config"]["data"]["dataset"]),
                      (path.parent.parent / "config.yaml", lambda m: m["data"]["dataset"])):
        if meta.name == "config.yaml" and path.parent.name != "checkpoints":  # only a run's checkpoints/ directory
            continue
        if meta.is_file():
            try:
                import yaml
                text = meta.read_text(encoding="utf-8")
                found = get(json.loads(text) if meta.suffix == ".json" else yaml.safe_load(text))
                if isinstance(found, str):
                    return found
            except Exception:  # noqa: BLE001 - unreadable metadata says nothing; the weights are checked anyway
                pass
    return None


def check_dataset(path: str | Path, dataset: str | None, obj: Any = None) -> None:
    """Refuse a checkpoint made for another dataset than the config's (a Fashion-MNIST base under an MNIST config)."""
    made = dataset_of(path, obj) if dataset else None
    if made is not None and made != dataset:
        raise CheckpointError(f"checkpoint '{path}' was trained on {made}, the config says data.dataset: {dataset}; "
                              f"use a {dataset} checkpoint or the {made} config")


def load_state_dict(path: str | Path, weights: str = "auto", dataset: str | None = None) -> dict[str, torch.Tensor]:
    """A shipped papa checkpoint ({'state_dict': …}), a trainer round checkpoint ({'model': …, 'ema': …}) or a bare
    reference state dict; `module.` prefixes stripped, floating tensors cast to float32. `weights` picks from a round
    checkpoint: 'policy' the trained model, 'ema' its moving average (train.ema_decay > 0), 'auto' the EMA where the
    run kept one (the model its evaluations judged), else the policy."""
    return state_dict_of(load(path), path, weights, dataset)


def state_dict_of(obj, path: str | Path, weights: str = "auto", dataset: str | None = None) -> dict[str, torch.Tensor]:
    """`load_state_dict` of a checkpoint already read (`obj`, from `load(path)`)."""
    check_dataset(path, dataset, obj)
    sd = _select(obj, path, weights)[1]
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


class RunLock:
    """An exclusive lock on a run directory (`<run_dir>/.lock`, flock), held while a trainer writes there, so a second
    trainer started on the same directory stops at once instead of interleaving its files with the first's. The OS
    drops the lock when the process ends, however it ends: a killed run never leaves a stale lock."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            from papa.config import ConfigError
            raise ConfigError(f"run directory {self.path.parent} is in use by another papa process (pid {holder}); "
                              "wait for it to finish, or pick another train.sample_path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
