"""Online preference alignment: `torchrun --nproc_per_node=N -m papa.train --config configs/mnist.yaml`.

Runs PAPA (or ePAPA with train.epapa_k > 0) in online rounds against the configured feedback source, evaluating with
the independent evaluator, writing `<train.output_dir>/<task_name>/<sample_path>/` (config.yaml, log.txt,
metrics.jsonl/.csv, rounds/NNN/, checkpoints/, curves.png, summary.md). Also runs as one process with
`python -m papa.train`. Exit codes: 0 done, 2 bad input (nothing written), 3 non-finite loss (last good checkpoint
kept).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from papa.cli import add_config_args, add_threads_arg, apply_threads, run_main
from papa.config import ConfigError, load_config, to_dict


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun -m papa.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_args(ap, default=None)
    ap.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue an interrupted run from its directory (uses its config.yaml unless --config)")
    ap.add_argument("--force", action="store_true", help="resume even though the config changed")
    ap.add_argument("--overwrite", action="store_true", help="start afresh in an existing run directory")
    add_threads_arg(ap, "torch CPU threads per process (0: torch's default)")
    args = ap.parse_args(argv)

    # --- validate everything before any work
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; pass the run directory of a papa run")
        cfg = load_config(args.config or saved, args.overrides)
        changed = _diff(to_dict(load_config(saved)), to_dict(cfg))
        if changed and not args.force:
            raise ConfigError(f"--resume {args.resume}: the config differs from the run's in {', '.join(changed)}; "
                              "rerun without those changes or pass --force")
        run_dir = Path(args.resume)
    else:
        cfg = load_config(args.config or "configs/mnist.yaml", args.overrides)
        from papa.engine import run_dir_for
        run_dir = run_dir_for(cfg)
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()) and not args.overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; use --resume {run_dir}, --overwrite, "
                              "or another train.sample_path")
    for key in ("base", "evaluator") + (("oracle",) if cfg.feedback.source == "oracle" else ()):
        p = getattr(cfg.checkpoints, key)
        if not Path(p).is_file():
            raise ConfigError(f"config key 'checkpoints.{key}': file '{p}' not found "
                              f"(ship it, or make it with python -m papa.{'pretrain' if key == 'base' else 'oracle'})")
    if cfg.model.arch == "reference" and not torch.cuda.is_available():
        print(f"warning: {cfg.model.arch} UNet with {cfg.diffusion.sample_steps}-step sampling on a CPU: expect hours "
              "per run (about 80 ms per image per UNet forward on 2 cores); use configs/mnist.yaml on CPUs",
              file=sys.stderr)

    apply_threads(args)
    from papa import dist
    from papa.engine import Engine, NonFiniteLoss
    rank, world, device = dist.init()
    torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)
    try:
        engine = Engine(cfg, run_dir, rank, world, device)
        if args.overwrite and rank == 0:
            for p in (run_dir / "checkpoints").glob("round_*.pt"):
                p.unlink()
        t0 = time.time()
        engine.run(resume=bool(args.resume))
        if rank == 0:
            print(f"done in {time.time() - t0:.0f} s -> {run_dir}/summary.md")
        return 0
    except NonFiniteLoss as e:
        if rank == 0:
            kept = sorted((run_dir / "checkpoints").glob("round_*.pt"))
            print(f"error: {e}; the round was abandoned and the last good checkpoint kept "
                  f"({kept[-1] if kept else 'none yet'}); lower train.lr or check the labels", file=sys.stderr)
        return 3
    finally:
        dist.teardown(world)


if __name__ == "__main__":
    run_main(main)
