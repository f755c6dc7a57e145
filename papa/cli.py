"""Shared command-line plumbing: --config/--set parsing and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from papa.config import Config, ConfigError, load_config


def add_config_args(ap: argparse.ArgumentParser, default: str | None = "configs/mnist.yaml") -> None:
    ap.add_argument("--config", default=default, help=f"YAML config (default: {default})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, validated like the YAML (e.g. --set sample.num=16); repeatable")


def add_threads_arg(ap: argparse.ArgumentParser, help: str = "torch CPU threads (0: torch's default)") -> None:
    ap.add_argument("--threads", type=int, default=0, help=help)


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def check_writable_dir(path, what: str) -> Path:
    """Raise ConfigError unless `path` is (or can be created as) a writable directory; creates nothing. Called before
    any work, so a bad output path fails in one line instead of after minutes of sampling or training."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise ConfigError(f"{what} '{path}': '{probe}' is a broken symbolic link; pick another directory")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} '{path}': '{probe}' is a file, not a directory; pick another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} '{path}': directory '{probe}' is not writable; pick another directory")
    return path


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run an entry point; user errors become one line on stderr and exit code 2.

    Under torchrun every rank validates the same input and fails alike, so only rank 0 prints the line. A rank that
    fails leaves at once (no barrier, no teardown): waiting for the others is how one rank's error used to hang a
    run, and torchrun stops the remaining ranks when one exits."""
    from papa.checkpoint import CheckpointError
    from papa.data import DataError
    from papa.dist import env_rank
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if env_rank() == 0 else (lambda m: None)
    try:
        code = main(None)
    except (ConfigError, CheckpointError, DataError) as e:
        say(f"error: {e}")
        code = 2
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    except Exception as e:
        import torch.distributed as dist
        if env_rank() != 0 and isinstance(e, dist.DistError):  # another rank failed first and said why
            code = 1
        else:
            raise
    _exit(code)


def _exit(code: int) -> None:
    import torch.distributed as dist
    if code != 0 and dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the process group's teardown, which would wait for ranks that may never come
    sys.exit(code)
