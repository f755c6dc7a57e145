"""Sample images from a base or finetuned papa model and judge them with the evaluator.

    python -m papa.sample --config configs/mnist.yaml [--checkpoint PATH] [--num N] [--seed S] [--out DIR]
                          [--precision bf16] [--compile] [--weights auto|policy|ema]
    python -m papa.sample --config <population run>/config.yaml --user ID      (a user's adapter, papa.population)

Writes to DIR (default `samples/<task_name>`): `grid.png` (an image grid), `samples.pt` (float tensor (N, 1, 28, 28)
in [−1, 1]) and `stats.json` (the evaluator's class histogram, mean confidence, FID against the test set on evaluator
features when the dataset is available and N >= 2 (else `fid_vs_test: null` and a `fid_note` saying why), settings
and timing). ePAPA's switch is honoured: with `--epapa-k K` (or `sample.epapa_k`), steps t < K use the frozen base
model (`checkpoints.base`). Every input (config, --out, checkpoints, a given data.root) is checked before sampling.
A finetuned model is a run's `checkpoints/round_NNN.pt`; where the run kept an EMA of its policy (`train.ema_decay`,
the MNIST default) that EMA is what its evaluations judged, and what is sampled unless `--weights policy`.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

from papa import checkpoint
from papa.checkpoint import WEIGHTS
from papa.cli import (add_config_args, add_threads_arg, apply_threads, check_writable_dir, config_from_args,
                      run_main)
from papa.config import dump_yaml
from papa.data import CLASS_NAMES, DataError, load_dataset
from papa.records import save_grid  # noqa: F401 - also papa.sample.save_grid


def fid_reference(cfg, num: int):
    """(test images uint8 or None, note or None) for the FID, decided before sampling.

    The FID fits a covariance to each set, which needs at least 2 samples: one image is a legitimate request, so it
    gets `fid_vs_test: null` with a note, not an error. Without `data.root` a missing test set is only a note too (the
    images and class statistics still stand); with `data.root` the user named the data, so an unusable directory is
    a DataError (exit 2) before any sampling."""
    if num < 2:
        return None, f"FID needs at least 2 samples, got {num}; sample 2 or more (--num) for an FID"
    if cfg.data.root:
        return load_dataset(cfg.data.dataset, "test", root=cfg.data.root)[0], None
    try:
        return load_dataset(cfg.data.dataset, "test")[0], None
    except (DataError, OSError, ValueError) as e:  # no offline copy of the test set: the rest still stands
        return None, f"test set unavailable: {e}"


def user_checkpoint(cfg, user: str, run: str | None) -> Path:
    """The newest round checkpoint of `user` in a population run (the run directory `run`, or the config's)."""
    from papa.config import ConfigError
    from papa.engine import run_dir_for
    if run and not Path(run).is_dir():
        raise ConfigError(f"--user {user} --checkpoint {run}: with --user, --checkpoint names the population run's "
                          "directory (or leave it out to use the config's run directory)")
    root = Path(run) if run else run_dir_for(cfg)
    users = root / "users"
    if not users.is_dir():
        raise ConfigError(f"--user {user}: {root} is not a population run (no users/ directory); pass the run "
                          "directory as --checkpoint or the run's config.yaml as --config")
    found = checkpoint.round_files(users / user / "checkpoints")
    if not found:
        known = sorted(p.name for p in users.iterdir() if p.is_dir())
        raise ConfigError(f"--user {user}: no checkpoint of that user under {users}; the users there are {known}")
    return found[-1][1]


def main(argv: list[str] | None = None) -> int:
    from papa.data import to_model_range
    from papa.metrics import class_stats, classify, frechet_distance
    from papa.models import load_classifier, load_unet
    from papa.sampling import PRECISIONS, sample, supports_bf16
    from papa.schedule import NoiseSchedule

    ap = argparse.ArgumentParser(prog="python -m papa.sample", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_args(ap)
    ap.add_argument("--checkpoint", default=None, help="UNet weights (default: checkpoints.base of the config)")
    ap.add_argument("--weights", choices=WEIGHTS, default="auto",
                    help="from a trainer round checkpoint: 'ema' the EMA its evaluations judged (train.ema_decay > 0), "
                         "'policy' the trained model itself; 'auto' the EMA where there is one (default: auto)")
    ap.add_argument("--user", default=None,
                    help="sample this user's model from a population run (users.population): the newest round of "
                         "<run>/users/ID/, where <run> is --checkpoint if it is a directory, else the config's run "
                         "directory; pass the population run's config.yaml as --config")
    ap.add_argument("--num", type=int, default=None, help="number of images (default: sample.num)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: sample.seed)")
    ap.add_argument("--epapa-k", type=int, default=None, help="use the base model for t < K (default: sample.epapa_k)")
    ap.add_argument("--out", default=None, help="output directory (default: samples/<task_name>)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--compile", action="store_true",
                    help="run the UNet through torch.compile (inductor; compiles for up to a minute; 1.00-1.09x "
                         "per step on the 2-core CPU, bench/README.md)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="UNet precision: bf16 runs it under autocast (1.76x the fp32 loop on the 2-core AMX CPU, "
                         "bench/README.md; images not bit-equal to fp32, statistics in docs/SAMPLING.md)")
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args)
    for flag, key in (("num", "sample.num"), ("seed", "sample.seed"), ("epapa_k", "sample.epapa_k")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    cfg = config_from_args(args)
    s, d = cfg.sample, cfg.diffusion
    ckpt = args.checkpoint or cfg.checkpoints.base
    if args.user is not None:
        ckpt = user_checkpoint(cfg, args.user, args.checkpoint)
    # check and load everything before any work or writing: a bad path fails in one line with nothing written
    out = check_writable_dir(args.out or f"samples/{cfg.task_name}", "--out")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = cfg.data.dataset  # a checkpoint that says it was made for another dataset is refused
    model = load_unet(cfg.model, ckpt, args.weights, dataset=ds, adapter=cfg.adapter,
                      base=cfg.checkpoints.base).to(device)
    base = load_unet(cfg.model, cfg.checkpoints.base, dataset=ds).to(device) if s.epapa_k > 0 else None
    evaluator = load_classifier("evaluator", cfg.checkpoints.evaluator, ds)
    test_set, fid_note = fid_reference(cfg, s.num)
    if args.precision == "bf16" and not supports_bf16(device):
        print(f"warning: --precision bf16 on a {device.type} without fast bf16 kernels may be slower than fp32")

    t0 = time.time()
    images = sample(model, NoiseSchedule.from_config(d), s.num, steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                    seed=s.seed, batch_size=s.batch_size, base_model=base, epapa_k=s.epapa_k,
                    progress=not args.quiet, device=device, cuda_graph=device.type == "cuda", compile_unet=args.compile,
                    precision=args.precision)
    seconds = time.time() - t0
    probs, feats = classify(evaluator, images)
    stats = class_stats(probs)
    stats["fid_vs_test"] = None
    if test_set is not None:
        try:
            test_feats = classify(evaluator, to_model_range(torch.from_numpy(test_set)))[1]
            stats["fid_vs_test"] = frechet_distance(feats, test_feats)
        except ValueError as e:  # e.g. non-finite features from a diverged model: the images are still worth saving
            fid_note = f"FID not computed: {e}"
    if fid_note:
        stats["fid_note"] = fid_note
    stats.update(precision=args.precision, compiled=args.compile, class_names=CLASS_NAMES[cfg.data.dataset],
                 checkpoint=str(ckpt), weights=checkpoint.resolved_weights(ckpt, args.weights), sampler=d.sampler,
                 sample_steps=d.sample_steps, seed=s.seed, epapa_k=s.epapa_k, sample_seconds=round(seconds, 2),
                 torch_threads=torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)  # checked above; only now created
    save_grid(images, out / "grid.png")
    buf = io.BytesIO()
    torch.save(images, buf)
    checkpoint.atomic_write_bytes(out / "samples.pt", buf.getvalue())
    checkpoint.atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
    checkpoint.atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    frac = " ".join(f"{n}:{f:.2f}" for n, f in zip(range(10), stats["class_fraction"]))
    print(f"{s.num} samples in {seconds:.1f}s -> {out}/grid.png | classes {frac}"
          + (f" | rejected (no member of any class) {stats['rejected_rate']:.3f}" if "rejected_rate" in stats else "")
          + f" | mean confidence {stats['mean_confidence']:.3f}"
          + (f" | FID vs test {stats['fid_vs_test']:.2f}" if stats["fid_vs_test"] is not None else ""))
    return 0


if __name__ == "__main__":
    run_main(main)
