"""Judge finished runs' evaluation images again, with another evaluator (or with their own, as a check).

    python -m papa.rejudge RUN_DIR [RUN_DIR ...] [--evaluator FILE] [--out FILE.json] [--grids DIR] [--threads N]

A run keeps the images of its first and last evaluations (`rounds/000/eval_images.pt`, the base model's, and
`rounds/<last>/eval_images.pt`; eval.final_num of each). This judges both with `--evaluator` (default: the run's own
`checkpoints.evaluator`) as the run's evaluation did (`RunEvaluator.judge_images`: every metric but the KL to the
base, which needs the weights), and prints per run the recorded and the new legible preferred rate, rejected rate,
smallest liked share, precision and FID of the last evaluation, and the bounds of docs/ALIGNMENT.md it meets against
the base judged by the same evaluator. Judged by the run's own evaluator, the figures equal the recorded ones
(tests/test_train.py), so any difference is the evaluator's. A run made before evaluation images were kept, or
whose round-0 evaluation came from a cache without them, is a one-line error naming what is missing. With `--grids
DIR`, what the evaluator now rejects in each run's last evaluation, beside what it accepts in a preferred class (up to
64 each, in sample order), goes to DIR/<run>_rejected.png and DIR/<run>_accepted.png, <run> being the run directory's
last three parts joined by "__".
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from papa import checkpoint
from papa.cli import run_main
from papa.config import ConfigError, load_config

SHOWN = (("legible_preferred_rate", "rate"), ("rejected_rate", "rejected"), ("min_liked_share", "smallest liked"),
         ("precision", "precision"), ("fid_preferred", "FID"))


def _images(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run kept no images of that evaluation (it was made before papa "
                          "kept them, or its base evaluation came from a cache without them); rerun it to judge it")
    x = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ConfigError(f"{path} is not a tensor of images (N, C, H, W); rerun the run to write it again")
    return x


def grid_name(run: Path) -> str:
    """The file stem of a run's grids under --grids: the run directory's last three parts joined by "__"."""
    return "__".join(Path(run).parts[-3:])


def evaluator_for(cfg, path: str | None = None):
    """A RunEvaluator for a run's config, with the evaluator file `path` (default: the run's own), as its
    evaluation built it: its preference, test images and fixed real sets."""
    from papa.data import load_dataset
    from papa.evaluation import RunEvaluator
    from papa.models import load_classifier
    from papa.schedule import NoiseSchedule
    net = load_classifier("evaluator", path or cfg.checkpoints.evaluator, cfg.data.dataset)
    xte, yte = load_dataset(cfg.data.dataset, "test", root=cfg.data.root or None)
    return RunEvaluator(net, xte, yte, cfg, NoiseSchedule.from_config(cfg.diffusion))


def rejudge(run: Path, evaluator: str | None = None, grids: Path | None = None) -> dict:
    """The run's base and last evaluations judged again: {"run", "evaluator", "base", "final", "recorded_base",
    "recorded_final", "bounds"} (metric dicts as in metrics.jsonl, without the KL). With `grids`, the last
    evaluation's rejected and accepted-preferred samples as PNG grids there (module docstring)."""
    from papa.evaluation import TARGET_RATE, bounds_met
    from papa.compare import read_metrics
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} has no config.yaml: pass a run directory of papa.train")
    cfg = load_config(run / "config.yaml")
    rows = [r for r in read_metrics(run) if "legible_preferred_rate" in r or "preferred_rate" in r]
    if not rows or rows[-1]["round"] != cfg.train.rounds:
        raise ConfigError(f"{run} is not finished (no final evaluation in its metrics.jsonl); finish it first")
    base_row, last_row = rows[0], rows[-1]
    path = evaluator or cfg.checkpoints.evaluator
    ev = evaluator_for(cfg, path)
    judged = {}
    for name, row in (("base", base_row), ("final", last_row)):
        images = _images(run / "rounds" / f"{row['round']:03d}" / "eval_images.pt")
        judged[name], decisions = ev.judge_images(images)
    if grids is not None:   # images and decisions are the last evaluation's
        from papa.records import save_decision_grids
        save_decision_grids(images, decisions, cfg.feedback.preference,
                            lambda what: Path(grids) / f"{grid_name(run)}_{what}.png")
    target = TARGET_RATE.get(cfg.data.dataset, 0.9)
    return {"run": str(run), "evaluator": str(path), "evaluator_sha256": checkpoint.sha256_file(path),
            **judged, "recorded_base": base_row, "recorded_final": last_row,
            "bounds": bounds_met(judged["final"], judged["base"], len(cfg.feedback.preference), target)}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "—"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.rejudge", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished papa.train run directories")
    ap.add_argument("--evaluator", default=None, help="evaluator file (default: each run's checkpoints.evaluator)")
    ap.add_argument("--out", default="", help="also write every result to this JSON file")
    ap.add_argument("--grids", default="", metavar="DIR", help="also write each run's rejected and accepted-preferred "
                    "samples of its last evaluation as PNG grids under DIR")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.evaluator and not Path(args.evaluator).is_file():
        raise ConfigError(f"--evaluator {args.evaluator}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print("| run | " + " | ".join(f"{label} (recorded → now)" for _, label in SHOWN) + " | bounds failed |")
    print("|---" * (len(SHOWN) + 2) + "|")
    for run in args.runs:
        res = rejudge(Path(run), args.evaluator, Path(args.grids) if args.grids else None)
        results.append(res)
        failed = [k for k, ok in res["bounds"].items() if ok is False]
        print(f"| {run} | " + " | ".join(f"{_fmt(res['recorded_final'].get(k))} → {_fmt(res['final'].get(k))}"
                                         for k, _ in SHOWN) + f" | {', '.join(failed) or 'none'} |", flush=True)
    if args.out:
        checkpoint.atomic_write_text(Path(args.out), json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    run_main(main)
