"""Pretrain the base DDPM: uniform t, unweighted MSE on ε (docs/ALGORITHMS.md §1), Adam with warm-up and cosine decay, EMA.

    python -m papa.pretrain --config configs/mnist.yaml [--out runs/pretrain/mnist] [--resume]

The run directory holds the resolved config, a log and `state.pt` (model, EMA, optimiser, RNG, step), written
atomically every `pretrain.checkpoint_every` steps; `--resume` continues from it. At the end the EMA weights are saved
in fp16 to `checkpoints.base` (the file papa ships), together with a JSON sidecar describing how it was made.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from papa import checkpoint
from papa.cli import add_config_args, check_writable_dir, config_from_args, run_main
from papa.config import ConfigError, config_hash, dump_yaml, to_dict
from papa.data import to_model_range, load_dataset, sha256_array
from papa.models import build_unet
from papa.schedule import NoiseSchedule


def pretrain_hash(cfg) -> str:
    """Hash of the sections that decide pretraining (the others, e.g. train or eval, may change freely)."""
    return config_hash({k: to_dict(getattr(cfg, k)) for k in ("data", "model", "diffusion", "pretrain")})


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _last_logged(out: Path, key: str):
    lines = (out / "log.txt").read_text().splitlines() if (out / "log.txt").is_file() else []
    return json.loads(lines[-1])[key] if lines else None


def pick_device(name: str) -> torch.device:
    """--device: auto (cuda if available), cpu, cuda or cuda:N; an unusable one is a one-line error (exit 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                          "use --device cpu or auto")
    return dev


STATE_KEYS = {"model": dict, "ema": dict, "opt": dict, "gen": torch.Tensor, "step": int, "config_hash": str}


def load_state(path: Path, cfg, device, force: bool) -> dict:
    """<out>/state.pt for --resume, checked: a papa pretraining state (a dict with STATE_KEYS of the right types),
    made with this data/model/diffusion/pretrain config (unless --force). Anything else is a one-line
    CheckpointError, never a KeyError or TypeError from half-way through resuming."""
    st = checkpoint.load(path, map_location=device)
    if not isinstance(st, dict):
        raise checkpoint.CheckpointError(f"{path} holds a {type(st).__name__}, not a papa pretraining state; delete "
                                         "it or rerun without --resume")
    for key, tp in STATE_KEYS.items():
        if key not in st:
            raise checkpoint.CheckpointError(f"{path} has no '{key}': not a complete papa pretraining state; delete it "
                                             "or rerun without --resume")
        if not isinstance(st[key], tp) or isinstance(st[key], bool):
            raise checkpoint.CheckpointError(f"{path}: '{key}' is a {type(st[key]).__name__}, not what papa.pretrain "
                                             "writes; delete it or rerun without --resume")
    if st["config_hash"] != pretrain_hash(cfg) and not force:
        raise checkpoint.CheckpointError(f"{path} was made with another data/model/diffusion/pretrain "
                                         "config; rerun without --resume (or --force)")
    return st


def apply_state(st: dict, path: Path, model, ema, opt, gen) -> int:
    """Load a checked state into the run's objects; returns its step. Weights of another shape (--force across a model
    change) are a CheckpointError."""
    try:
        model.load_state_dict(st["model"]); ema.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"].cpu())
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise checkpoint.CheckpointError(f"{path} does not fit this config's model or optimiser ({why}); rerun "
                                         "without --resume") from None
    return st["step"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.pretrain", description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--out", default=None, help="run directory (default runs/pretrain/<task_name>)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda[:N]; batches "
                    "and noise are drawn on the CPU from the seeded generator either way")
    ap.add_argument("--force", action="store_true", help="resume although the pretraining config changed")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--stop-at", type=int, default=0, metavar="STEP",
                    help="stop at this step and export (the learning-rate schedule stays that of pretrain.steps)")
    args = ap.parse_args(argv)
    # everything is checked and loaded before the run directory is created or anything in it written: a refused run
    # leaves an existing directory (its config.yaml, log.txt, state.pt) exactly as it was, and makes no new one
    cfg = config_from_args(args)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = cfg.pretrain
    out = check_writable_dir(args.out or f"runs/pretrain/{cfg.task_name}", "--out")
    check_writable_dir(Path(cfg.checkpoints.base).parent, "checkpoints.base's directory")
    state_path = out / "state.pt"
    st = load_state(state_path, cfg, device, args.force) if args.resume and state_path.is_file() else None

    sched = NoiseSchedule.from_config(cfg.diffusion)
    model = build_unet(cfg.model).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    gen = torch.Generator().manual_seed(p.seed)
    torch.manual_seed(p.seed)
    step = 0
    if st is not None:
        step = apply_state(st, state_path, model, ema, opt, gen)
    x_np, _ = load_dataset(cfg.data.dataset, "train", root=cfg.data.root or None, verbose=True)
    data = to_model_range(torch.from_numpy(x_np))

    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    log = open(out / "log.txt", "a")
    if st is not None:
        print(f"resumed from step {step}")

    def save_state():
        checkpoint.atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                "gen": gen.get_state(), "step": step, "config_hash": pretrain_hash(cfg)}, state_path)

    model.train()
    t0 = time.time()
    last = min(p.steps, args.stop_at) if args.stop_at > 0 else p.steps
    bar = tqdm(total=last, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=2)
    running = None
    while step < last:
        idx = torch.randint(0, data.shape[0], (p.batch_size,), generator=gen)
        x0 = data[idx]
        t = torch.randint(0, sched.T, (p.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x0, t, eps = x0.to(device), t.to(device), eps.to(device)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, eps, t), t), eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(p.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % p.checkpoint_every == 0 or step == last:
            save_state()
            log.write(json.dumps({"step": step, "loss": running, "seconds": time.time() - t0}) + "\n")
            log.flush()
    bar.close()

    base = Path(cfg.checkpoints.base)
    command = (f"python -m papa.pretrain --config {args.config}" + "".join(f" --set {o}" for o in args.overrides)
               + (f" --stop-at {args.stop_at}" if args.stop_at else ""))
    meta = {"config": to_dict(cfg), "data_sha256": sha256_array(x_np), "training_steps": step,
            "device": str(device),
            "final_loss_ema": running if running is not None else _last_logged(out, "loss"),
            "seconds": round(_last_logged(out, "seconds") or time.time() - t0, 1)}  # across resumes
    weights = {k: v.cpu() for k, v in ema.state_dict().items()}
    checkpoint.save_fp16_with_sidecar(weights, {"model": to_dict(cfg.model), "kind": "unet"}, base, "base_ddpm",
                                      command, meta)
    print(f"saved EMA weights (fp16) to {base} ({base.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
