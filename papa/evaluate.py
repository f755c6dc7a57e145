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


@torch.no_grad()
def classify(evaluator: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (probabilities (N, 10), features (N, D)) of images in [−1, 1]."""
    evaluator.eval()
    probs, feats = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        f = evaluator.features(x)
        feats.append(f)
        head = evaluator.head if hasattr(evaluator, "head") else None
        probs.append(torch.softmax(head(f), 1) if head is not None else evaluator(x).exp())
    return torch.cat(probs), torch.cat(feats)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), in float64 via symmetric eigendecompositions.

    Raises ValueError for inputs it cannot judge, rather than letting them surface as a LinAlgError deep in eigh or as
    a NaN: a covariance needs at least 2 samples per set (torch.cov of one row is NaN), and non-finite features (from
    a diverged model) have no Gaussian to fit."""
    for name, f in (("first", f1), ("second", f2)):
        if f.ndim != 2:
            raise ValueError(f"FID: the {name} feature set must be (N, D), got shape {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 samples in each set; the {name} has {f.shape[0]}")
        if not torch.isfinite(f).all():
            raise ValueError(f"FID: the {name} feature set holds non-finite values (NaN or inf), e.g. from a diverged "
                             "model; there is no distance to report")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"FID: feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]})")
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def psd_sqrt(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = psd_sqrt(s1)
    tr_cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_cross)


def class_stats(probs: torch.Tensor, preferred: list[int] | None = None) -> dict:
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=probs.shape[1]).float() / len(pred)
    out = {"num": len(pred), "class_fraction": [round(float(h), 4) for h in hist],
           "mean_confidence": float(probs.max(1).values.mean())}
    if preferred:
        pref = torch.tensor(preferred)
        in_pref = torch.isin(pred, pref)
        out["preferred_rate"] = float(in_pref.float().mean())
        sub = hist[pref] / hist[pref].sum().clamp_min(1e-12)
        ent = -(sub * sub.clamp_min(1e-12).log()).sum()
        out["diversity"] = abs(float(ent / math.log(len(preferred)))) if len(preferred) > 1 else 1.0
        out["preferred_fraction_within"] = [round(float(s), 4) for s in sub]
    return out


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


def main(argv: list[str] | None = None) -> int:
    from papa.data import load_dataset
    from papa.models import load_classifier, load_unet
    from papa.oracle import accuracy
    from papa.pretrain import to_model_range
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
