"""Shared command-line plumbing: --config/--set parsing and one-line errors with exit code 2."""
from __future__ import annotations

import argparse
import sys
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


def run_main(main: Callable[[list[str] | None], int]) -> None:
    """Run an entry point; user errors become one line on stderr and exit code 2."""
    from papa.checkpoint import CheckpointError
    from papa.data import DataError
    try:
        code = main(None)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
