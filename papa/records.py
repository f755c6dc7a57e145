"""The files a run writes, all atomically: log.txt, metrics.jsonl / .csv, rounds/NNN/ (images, grid, labels), the
evaluation grids, curves.png and summary.md. Only rank 0 writes; a person who opens the run directory reads the run
from these without running code."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from papa import checkpoint
from papa.data import CLASS_NAMES
from papa.models.classifier import REJECT_CLASS


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Atomically write a PNG grid of images in [−1, 1]."""
    from torchvision.utils import save_image
    nrow = nrow or max(1, int(math.ceil(math.sqrt(len(images)))))
    buf = io.BytesIO()
    save_image((images + 1) / 2, buf, nrow=nrow, padding=2, format="png")
    checkpoint.atomic_write_bytes(path, buf.getvalue())


def save_decision_grids(images: torch.Tensor, decisions: torch.Tensor, preference, path_for) -> None:
    """The samples an evaluator rejects as no member of any class, and those it accepts in a preferred class, up to
    64 each in sample order, as PNG grids at path_for("rejected") and path_for("accepted") (none where there are none)."""
    decisions = decisions.cpu()
    for what, keep in (("rejected", decisions == REJECT_CLASS),
                       ("accepted", torch.isin(decisions, torch.tensor(list(preference))))):
        if keep.any():
            save_grid(images[keep][:64], path_for(what), nrow=8)


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / "rounds" / f"{r:03d}"


class Records:
    """Writes a run's records under `run_dir`; every method is a no-op on ranks other than 0 (`main` False)."""

    def __init__(self, run_dir: str | Path, main: bool = True):
        self.run_dir, self.main = Path(run_dir), main

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.run_dir / "log.txt", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def metrics(self, rows: list[dict]) -> None:
        """metrics.jsonl (every key) and metrics.csv (the scalar keys)."""
        if not self.main:
            return
        checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        checkpoint.atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def round_images(self, r: int, images: torch.Tensor) -> None:
        """rounds/NNN/grid.png and images.pt: what the user is asked about, written before the question."""
        if not self.main:
            return
        d = round_dir(self.run_dir, r)
        save_grid(images, d / "grid.png", nrow=min(10, len(images)))
        buf = io.BytesIO()
        torch.save(images.cpu(), buf)
        checkpoint.atomic_write_bytes(d / "images.pt", buf.getvalue())

    def round_labels(self, r: int, labels: dict) -> None:
        if self.main:
            checkpoint.atomic_write_text(round_dir(self.run_dir, r) / "labels.json", json.dumps(labels, indent=1))

    def eval_grid(self, tag: str, images: torch.Tensor, decisions: torch.Tensor | None = None,
                  preference: list[int] | None = None, keep_images: bool = False) -> None:
        """The evaluation's first 64 samples; with the evaluator's decisions, also the samples it rejects as no
        member of any class (`eval_rejected.png`) beside those it accepts in a preferred class (`eval_accepted.png`),
        up to 64 each in sample order. With `keep_images`, every sample too (`eval_images.pt`, float32, as judged), so
        that another evaluator can judge the same images later without sampling them again (papa.rejudge)."""
        if not self.main:
            return
        d = self.run_dir / "rounds" / tag
        save_grid(images[:64], d / "eval_grid.png", nrow=8)
        if keep_images:
            buf = io.BytesIO()
            torch.save(images.detach().to("cpu", torch.float32).clone(), buf)
            checkpoint.atomic_write_bytes(d / "eval_images.pt", buf.getvalue())
        if decisions is not None:
            save_decision_grids(images, decisions, preference or [], lambda what: d / f"eval_{what}.png")

    def line(self, row: dict) -> None:
        """One line per round on the console and in log.txt."""
        parts = [f"round {row['round']:3d}", f"labels {row['labels_used']:4d}"]
        if "legible_preferred_rate" in row:
            parts += [f"legible preferred {row['legible_preferred_rate']:.3f}"]
            if "rejected_rate" in row:
                parts += [f"rejected {row['rejected_rate']:.3f}"]
            parts += [f"diversity {row['diversity']:.3f}", f"FID {row['fid_preferred']:.2f}"]
        if "loss" in row:
            parts += [f"loss {row['loss']:+.4f}"]
        if "round_seconds" in row:
            parts += [f"{row['round_seconds']:.1f}s"]
        self.log(" | ".join(parts))

    def finish(self, cfg, name: str, rows: list[dict], rounds: int, elapsed: float) -> None:
        """curves.png and summary.md from the metric rows."""
        if not self.main:
            return
        rows = [m for m in rows if "preferred_rate" in m]
        if rows:
            self._curves(cfg, name, rows)
        first, last = (rows[0], rows[-1]) if rows else ({}, {})
        names = CLASS_NAMES[cfg.data.dataset]
        fmt = lambda m, k: f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "n/a"
        cols = [("legible preferred rate", "legible_preferred_rate"), ("rejected", "rejected_rate"),
                ("smallest liked class", "min_liked_share"), ("diversity", "diversity"),
                ("FID (preferred)", "fid_preferred"), ("precision", "precision"), ("recall", "recall"),
                ("coverage", "coverage"), ("ink drift", "ink_drift"), ("stroke drift", "stroke_drift"),
                ("argmax preferred rate", "preferred_rate")]
        lines = [f"# {cfg.task_name}: {name}", "",
                 f"Preference: {[names[c] for c in cfg.feedback.preference]}; method {cfg.train.algo}; {rounds} rounds "
                 f"× {cfg.train.samples_per_round} samples; {elapsed:.0f} s of training.", "",
                 "| | labels | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for tag, m in (("base", first), ("final", last)):
            if m:
                lines.append(f"| {tag} | {m['labels_used']} | " + " | ".join(fmt(m, k) for _, k in cols) + " |")
        lines += ["", "Judged by the evaluator classifier (never the oracle that gave feedback) on "
                  f"{cfg.eval.final_num} fixed-seed samples. The legible preferred rate is the share of all samples it "
                  "accepts and puts in a preferred class; rejected: the share it calls no member of any class; the "
                  "argmax preferred rate ignores that option. FID, precision / recall, coverage and the drifts compare "
                  "the legible preferred samples with real test images of those classes. What it rejects and accepts "
                  "at the end: `rounds/" + (f"{last['round']:03d}" if last else "NNN") + "/eval_rejected.png`, "
                  "`eval_accepted.png`. Curves: `curves.png`; per-round images and labels: "
                  "`rounds/`; every metric: `metrics.jsonl` / `metrics.csv`; config: `config.yaml`."]
        checkpoint.atomic_write_text(self.run_dir / "summary.md", "\n".join(lines) + "\n")

    def _curves(self, cfg, name: str, rows: list[dict]) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
        lab = [m["labels_used"] for m in rows]
        for key, label, style in (("legible_preferred_rate", "legible preferred", "-o"),
                                  ("rejected_rate", "rejected", "-s"), ("preferred_rate", "argmax preferred", ":.")):
            if any(key in m for m in rows):
                axes[0].plot(lab, [m.get(key, math.nan) for m in rows], style, label=label)
        axes[0].set_title("rates (evaluator)", fontsize=10)
        axes[0].legend(fontsize=8)
        for ax, key, title in zip(axes[1:], ("diversity", "fid_preferred"),
                                  ("diversity in preferred set", "FID, preferred classes (evaluator features)")):
            ax.plot(lab, [m[key] for m in rows], marker="o")
            ax.set_title(title, fontsize=10)
        for key in ("precision", "recall", "coverage"):
            axes[3].plot(lab, [m.get(key, math.nan) for m in rows], marker="o", label=key)
        axes[3].set_title("fidelity, preferred classes (evaluator features)", fontsize=10)
        axes[3].legend(fontsize=8)
        for ax in axes:
            ax.set_xlabel("labels used")
            ax.grid(alpha=0.3)
        axes[0].set_ylim(0, 1.02)
        axes[3].set_ylim(0, 1.02)
        fig.suptitle(f"{cfg.task_name} · {name} · preference {cfg.feedback.preference}", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        checkpoint.atomic_write_bytes(self.run_dir / "curves.png", buf.getvalue())
