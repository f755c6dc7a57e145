"""Evaluator metrics: class histogram, confidence, preferred-class rate, diversity, FID on evaluator features.

Every metric is judged by the *evaluator* classifier, never by the oracle that gives feedback. FID is the Fréchet
distance between Gaussians fitted to the evaluator's 128-d penultimate features (not Inception features: these are
28×28 grey images), so its scale is papa's own; the floor is the FID between the test set's two halves.

    python -m papa.evaluate --config configs/mnist.yaml [--num 1000] [--write-manifest]

measures the shipped base model (class balance, confidence, FID vs the test set, and the test-halves floor) and the
oracle's and evaluator's test accuracy, and with --write-manifest records them in checkpoints/<dataset>/manifest.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from papa import checkpoint
from papa.cli import add_config_args, check_writable_dir, config_from_args, run_main
from papa.config import ConfigError
from papa.fidelity import fidelity_report
from papa.metrics import class_stats, classify, frechet_distance  # noqa: F401 - also papa.evaluate's API


def manifest_files(ck) -> dict:
    """What --write-manifest records about each shipped file (its sidecar, sha256, size), gathered and checked before
    any sampling: a manifest that cannot be written, or a sidecar that is not JSON, is a one-line error up front."""
    d = Path(ck.base).parent
    check_writable_dir(d, "--write-manifest directory (beside checkpoints.base)")
    target = d / "manifest.json"
    if target.exists() and not target.is_file():
        raise ConfigError(f"--write-manifest: '{target}' exists and is not a file; remove it or point "
                          "checkpoints.base elsewhere")
    files = {}
    for kind, p in (("base_ddpm", ck.base), ("oracle", ck.oracle), ("evaluator", ck.evaluator)):
        if not Path(p).is_file():
            raise checkpoint.CheckpointError(f"--write-manifest: checkpoint '{p}' ({kind}) not found")
        side = Path(p).with_suffix(".json")
        info = {}
        if side.is_file():
            try:
                info = json.loads(side.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"--write-manifest: sidecar '{side}' is not valid JSON ({str(e).splitlines()[0]}); "
                                  "restore it from git or delete it") from None
            if not isinstance(info, dict):
                raise ConfigError(f"--write-manifest: sidecar '{side}' holds a {type(info).__name__}, not a JSON "
                                  "object; restore it from git or delete it")
        info["sha256"] = checkpoint.sha256_file(p)
        info["size_bytes"] = Path(p).stat().st_size
        files[kind] = info
    return files


def _fidelity(real_feats, feats, real_images, images) -> dict | None:
    """Every sample against 1,000 fixed real test images (all classes), as each run's evaluations judge; None when
    there are too few samples for the k-nearest-neighbour radii."""
    try:
        return {k: round(v, 4) for k, v in fidelity_report(real_feats, feats, real_images, images).items()}
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    from papa.data import load_dataset
    from papa.models import load_classifier, load_unet
    from papa.data import to_model_range
    from papa.metrics import accuracy
    from papa.sampling import sample
    from papa.schedule import NoiseSchedule

    ap = argparse.ArgumentParser(prog="python -m papa.evaluate", description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--num", type=int, default=1000, help="base-model samples to judge (default 1000)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--write-manifest", action="store_true", help="record the figures in checkpoints/<dataset>/manifest.json")
    args = ap.parse_args(argv)
    if args.num < 2:  # the FID fits a covariance to the samples: it needs two at least
        raise ConfigError(f"--num must be >= 2 (the FID needs at least 2 samples), got {args.num}")
    cfg = config_from_args(args)
    ck = cfg.checkpoints
    files = manifest_files(ck) if args.write_manifest else None  # before minutes of sampling, not after
    ds = cfg.data.dataset
    evaluator = load_classifier("evaluator", ck.evaluator, ds)
    oracle = load_classifier("oracle", ck.oracle, ds)
    model = load_unet(cfg.model, ck.base, dataset=ds)
    xte_np, yte_np = load_dataset(cfg.data.dataset, "test", root=cfg.data.root or None)
    xte, yte = to_model_range(torch.from_numpy(xte_np)), torch.from_numpy(yte_np).long()

    t0 = time.time()
    imgs = sample(model, NoiseSchedule.from_config(cfg.diffusion), args.num, steps=cfg.diffusion.sample_steps,
                  sampler=cfg.diffusion.sampler, eta=cfg.diffusion.eta, seed=args.seed, batch_size=cfg.sample.batch_size)
    sample_seconds = time.time() - t0
    probs, feats = classify(evaluator, imgs)
    _, test_feats = classify(evaluator, xte)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xte), generator=g)
    half = len(perm) // 2
    quality = {
        "base_samples": {**class_stats(probs), "sampler": cfg.diffusion.sampler, "steps": cfg.diffusion.sample_steps,
                         "seed": args.seed, "sample_seconds": round(sample_seconds, 1)},
        "fid_base_vs_test": frechet_distance(feats, test_feats),
        "fidelity_vs_test": _fidelity(test_feats[perm[:1000]], feats, xte[perm[:1000]], imgs),
        "fid_test_half_vs_half": frechet_distance(test_feats[perm[:half]], test_feats[perm[half:]]),
        "oracle_test_accuracy": accuracy(oracle, xte, yte),
        "evaluator_test_accuracy": accuracy(evaluator, xte, yte),
        "command": f"python -m papa.evaluate --config {args.config} --num {args.num} --seed {args.seed}",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }
    print(json.dumps(quality, indent=2))
    if files is not None:
        d = Path(ck.base).parent
        manifest = {"dataset": cfg.data.dataset, "quality": quality, "files": files}
        checkpoint.atomic_write_text(d / "manifest.json", json.dumps(manifest, indent=2))
        print(f"wrote {d / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    run_main(main)
