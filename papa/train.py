"""Online preference alignment: `torchrun --nproc_per_node=N -m papa.train --config configs/mnist.yaml`.

Runs PAPA (or ePAPA with papa.epapa_k > 0), or another method (train.algo), in online rounds against the configured feedback source, evaluating with
the independent evaluator, writing `<train.output_dir>/<task_name>/<sample_path>/` (config.yaml, log.txt,
metrics.jsonl/.csv, rounds/NNN/, checkpoints/, curves.png, summary.md). Also runs as one process with
`python -m papa.train`. Exit codes: 0 done, 2 bad input (nothing written), 3 non-finite loss (last good checkpoint
kept).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from papa import checkpoint, dist
from papa.cli import add_config_args, add_threads_arg, apply_threads, check_writable_dir, run_main
from papa.config import ConfigError, default_config, load_config, to_dict


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def launch(nproc: int, argv: list[str]) -> int:
    """Run this command on `nproc` local ranks through torchrun's own launcher and return the first failing rank's
    exit code (torchrun itself exits 1 for any failure, with a report of some 40 lines)."""
    import logging
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}")
    rest, skip = [], False
    for a in argv:  # drop the launcher's own flag; the ranks see WORLD_SIZE and train
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets, without its banner
    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "papa.train", *rest]))
    except ChildFailedError as e:
        return e.get_first_failure()[1].exitcode
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun -m papa.train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_config_args(ap, default=None)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--resume", metavar="RUN_DIR", default=None,
                      help="continue an interrupted run from its directory (uses its config.yaml unless --config)")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh in an existing run directory (its old files go once the new run is validated)")
    ap.add_argument("--force", action="store_true", help="resume even though the config changed")
    add_threads_arg(ap, "torch CPU threads per process (0: torch's default)")
    ap.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                    help="launch N processes on this machine, as `torchrun --standalone --nproc_per_node=N` does, "
                         "but exit with papa's own code (2 bad input, 3 non-finite training) and without torchrun's "
                         "failure report")
    args = ap.parse_args(argv)
    if args.nproc_per_node and "WORLD_SIZE" not in os.environ:
        return launch(args.nproc_per_node, sys.argv[1:] if argv is None else argv)

    # --- validate everything before any work (every rank alike, so they all stop on the same error)
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
        cfg = load_config(args.config or default_config(), args.overrides)
        from papa.engine import run_dir_for
        run_dir = run_dir_for(cfg)
        if checkpoint.round_files(run_dir / "checkpoints") and not args.overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; use --resume {run_dir}, --overwrite, "
                              "or another train.sample_path")
    check_writable_dir(run_dir, "run directory")
    for key in ("base", "evaluator") + (("oracle",) if cfg.feedback.source == "oracle" else ()):
        p = getattr(cfg.checkpoints, key)
        if not Path(p).is_file():
            raise ConfigError(f"config key 'checkpoints.{key}': file '{p}' not found "
                              f"(ship it, or make it with python -m papa.{'pretrain' if key == 'base' else 'oracle'})")
    if cfg.model.arch == "reference" and not torch.cuda.is_available() and dist.env_rank() == 0:
        print(f"warning: {cfg.model.arch} UNet with {cfg.diffusion.sample_steps}-step sampling on a CPU: expect hours "
              "per run (about 80 ms per image per UNet forward on 2 cores); use configs/mnist.yaml on CPUs",
              file=sys.stderr)

    apply_threads(args)
    from papa.engine import Engine, NonFiniteLoss
    rank, world, device = dist.init()
    torch.use_deterministic_algorithms(not torch.cuda.is_available(), warn_only=True)
    ok = False
    try:
        t0 = time.time()
        if cfg.users.population:  # every user of a population, each their own adapter (papa/population.py)
            if args.overwrite:
                raise ConfigError("--overwrite does not apply to a population run; remove its directory or set "
                                  "another train.sample_path")
            from papa.population import run_population
            run_population(cfg, run_dir, rank, world, device, resume=bool(args.resume), force=args.force)
            if rank == 0:
                print(f"done in {time.time() - t0:.0f} s -> {run_dir}/population.md")
            ok = True
            return 0
        engine = Engine.from_config(cfg, run_dir, rank, world, device)
        engine.run(resume=bool(args.resume), force=args.force, overwrite=args.overwrite)
        if rank == 0:
            print(f"done in {time.time() - t0:.0f} s -> {run_dir}/summary.md")
        ok = True
        return 0
    except NonFiniteLoss as e:  # every rank sees it: the all-reduced loss, gradients and weights are the same
        if rank == 0:
            kept = checkpoint.round_files(run_dir / "checkpoints")  # (a population run: under users/<id>/)
            print(f"error: {e}; the round was abandoned and the last good checkpoint kept "
                  f"({kept[-1][1] if kept else 'none yet'}); lower train.lr or check the labels", file=sys.stderr)
        return 3
    finally:
        dist.teardown(world, ok)


if __name__ == "__main__":
    run_main(main)
