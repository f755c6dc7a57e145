"""A run directory's life on disk: taken by one trainer (locked, tidied, cleared for --overwrite), round checkpoints
written atomically and pruned to the newest two, the newest usable one found for --resume, and the base model's
round-0 evaluation cached for every run that shares its inputs.

What a checkpoint must hold and fit is the engine's business (it passes a loader); what counts as usable, what is
kept, and when a resume is refused rather than started over is decided here, once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from papa import checkpoint
from papa.config import config_hash

# files a run writes at the top of its directory; --overwrite removes these (and rounds/, checkpoints/) only
RUN_FILES = ("config.yaml", "log.txt", "metrics.jsonl", "metrics.csv", "summary.md", "curves.png")


def clear_run(path: Path) -> None:
    """Remove a run's files (records, rounds, checkpoints) from its directory, the directory itself kept."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for sub in ("rounds", "checkpoints"):
        shutil.rmtree(path / sub, ignore_errors=True)


class RunDir:
    def __init__(self, path: str | Path, log: Callable[[str], None] = print):
        self.path, self.log = Path(path), log
        self.ckpt_dir = self.path / "checkpoints"
        self.lock: checkpoint.RunLock | None = None

    def take(self, overwrite: bool = False) -> None:
        """Lock the directory (a second trainer stops at once), remove what a killed writer left, and for --overwrite
        remove the old run's files: only now, after the new run has been validated and holds the lock."""
        self.lock = checkpoint.RunLock(self.path).acquire()
        for d in (self.path, self.ckpt_dir, *sorted((self.path / "rounds").glob("*"))):
            checkpoint.remove_stale_temps(d)
        if overwrite:
            clear_run(self.path)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def save(self, r: int, payload: dict) -> Path:
        """round_NNN.pt, atomically; then keep it and the newest earlier one (the last good)."""
        path = self.ckpt_dir / f"round_{r:03d}.pt"
        checkpoint.atomic_save(payload, path)
        checkpoint.prune_rounds(self.ckpt_dir, r)
        return path

    def newest_usable(self, load: Callable[[Path, int], dict]) -> dict | None:
        """The state `load(path, round)` gives for the newest checkpoint it accepts; an unusable one (load raises:
        corrupt, truncated, wrong structure or provenance, non-finite weights) is reported and the previous one tried.
        None when there is no checkpoint and the records say no round was done (the run stopped in its first round).
        Refuses (CheckpointError), changing nothing, when checkpoints exist but none is usable, or the records name
        rounds no checkpoint holds: starting again would silently redo, and then overwrite, the old run."""
        files = checkpoint.round_files(self.ckpt_dir)
        problems = []
        for n, path in reversed(files):
            try:
                st = load(path, n)
            except (checkpoint.CheckpointError, KeyError, RuntimeError, ValueError, TypeError) as e:
                problems.append(f"{path.name}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
                self.log(f"warning: {path.name} is unusable ({problems[-1]}); trying the previous checkpoint")
                continue
            self.log(f"resumed from {path} (round {n} done)")
            return st
        if files:
            raise checkpoint.CheckpointError(
                f"--resume {self.path}: no usable checkpoint ({'; '.join(problems)}); nothing was changed. Move "
                "the bad files out of checkpoints/ to resume from an earlier one, or start afresh with --overwrite")
        done = self.recorded_rounds()
        if done > 0:
            raise checkpoint.CheckpointError(
                f"--resume {self.path}: metrics.jsonl records {done} round(s) but checkpoints/ holds none; nothing "
                "was changed. Restore the checkpoints, or start afresh with --overwrite")
        self.log("no checkpoint yet (the run stopped in its first round): starting at round 1")
        return None

    def recorded_rounds(self) -> int:
        f = self.path / "metrics.jsonl"
        try:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
            return max((int(r.get("round", 0)) for r in rows if isinstance(r, dict)), default=0)
        except (ValueError, OSError):
            return 1  # unreadable records of a run that did something: do not start over them


class BaseEvalCache:
    """The base model's round-0 evaluation, kept under <output_dir>/<task>/.base_eval/ for reuse: it depends only on
    the base checkpoint and the evaluator (by content), the data, the preference and the evaluation settings (`key`),
    so every method and seed shares it. Written with a digest of its values: a truncated, stale or hand-edited file is
    evaluated again. `key` None: no cache (an engine built from in-memory modules)."""

    def __init__(self, root: Path, key: dict | None, log: Callable[[str], None] = print):
        self.key, self.log = key, log
        self.path = root / ".base_eval" / f"{config_hash(key)}.json" if key is not None else None

    @property
    def grid(self) -> Path | None:
        return self.path.with_suffix(".png") if self.path is not None else None

    def read(self, num: int) -> dict | None:
        """The cached metrics of a `num`-sample evaluation, or None (evaluate)."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            rec = json.loads(self.path.read_text())
            ev, key = rec["metrics"], rec["key"]
            ok = (key == self.key and rec["digest"] == config_hash({"key": key, "metrics": ev})
                  and 0.0 <= ev["preferred_rate"] <= 1.0 and ev["eval_num"] == num)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.log(f"warning: {self.path} is not a valid base-model evaluation; evaluating the base model again")
            return None
        return ev

    @property
    def images(self) -> Path | None:
        """The evaluation's images (a run's `rounds/000/eval_images.pt`), kept beside the metrics for re-judging."""
        return self.path.with_suffix(".images.pt") if self.path is not None else None

    def write(self, ev: dict, grid_png: bytes, images_pt: bytes | None = None) -> None:
        if self.path is None:
            return
        checkpoint.atomic_write_bytes(self.grid, grid_png)
        if images_pt is not None:
            checkpoint.atomic_write_bytes(self.images, images_pt)
        checkpoint.atomic_write_text(self.path, json.dumps({"key": self.key, "metrics": ev,
                                                            "digest": config_hash({"key": self.key, "metrics": ev})}))
