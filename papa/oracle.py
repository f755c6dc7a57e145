"""Train the simulated user (oracle) and the independent evaluator classifier for a dataset.

    python -m papa.oracle --config configs/mnist.yaml [--which oracle|evaluator|both]

oracle:    the reference MNIST-example CNN, Adadelta (lr 1.0), StepLR γ 0.7 per epoch, dropout; inputs in [−1, 1].
evaluator: a batch-normalised VGG-style CNN, Adam, another seed: every papa metric is judged by it, never by the oracle.
Each is saved in fp16 to `checkpoints.oracle` / `checkpoints.evaluator` with a JSON sidecar (sha256, command, config,
data digest, steps, test accuracy). `python -m papa.oracle --config … --eval-only` re-measures test accuracy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from papa import checkpoint
from papa.cli import add_config_args, config_from_args, run_main
from papa.config import to_dict
from papa.data import load_dataset, sha256_array
from papa.models import load_classifier
from papa.models.classifier import CLASSIFIERS
from papa.data import to_model_range
from papa.metrics import accuracy


def train_classifier(kind: str, tcfg, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    model = CLASSIFIERS[kind]()
    if kind == "oracle":
        opt = torch.optim.Adadelta(model.parameters(), lr=tcfg.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=tcfg.gamma)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs)
    steps = 0
    for epoch in range(tcfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        bar = tqdm(range(0, len(x), tcfg.batch_size), desc=f"{kind} epoch {epoch + 1}/{tcfg.epochs}", dynamic_ncols=True)
        for i in bar:
            idx = perm[i:i + tcfg.batch_size]
            loss = F.nll_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        sched.step()
    return model.eval(), steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.oracle", description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--which", choices=("oracle", "evaluator", "both"), default="both")
    ap.add_argument("--eval-only", action="store_true", help="measure the saved classifiers' test accuracy only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr_np, ytr_np = load_dataset(cfg.data.dataset, "train", root=cfg.data.root or None, verbose=True)
    xte_np, yte_np = load_dataset(cfg.data.dataset, "test", root=cfg.data.root or None, verbose=True)
    xtr, ytr = to_model_range(torch.from_numpy(xtr_np)), torch.from_numpy(ytr_np).long()
    xte, yte = to_model_range(torch.from_numpy(xte_np)), torch.from_numpy(yte_np).long()
    kinds = ("oracle", "evaluator") if args.which == "both" else (args.which,)
    for kind in kinds:
        path = Path(getattr(cfg.checkpoints, kind))
        if args.eval_only:
            print(f"{kind}: test accuracy {accuracy(load_classifier(kind, path), xte, yte):.4f} ({path})")
            continue
        t0 = time.time()
        tcfg = getattr(cfg, kind)
        model, steps = train_classifier(kind, tcfg, xtr, ytr)
        command = (f"python -m papa.oracle --config {args.config} --which {kind}"
                   + "".join(f" --set {o}" for o in args.overrides))
        meta = {"config": {kind: to_dict(tcfg), "data": to_dict(cfg.data)},
                "data_sha256": {"train_x": sha256_array(xtr_np), "train_y": sha256_array(ytr_np)},
                "training_steps": steps, "seconds": round(time.time() - t0, 1)}
        checkpoint.save_fp16_with_sidecar(model.state_dict(), {"kind": kind}, path, kind, command, meta)
        # measure the accuracy of what was saved (fp16 weights), not of the fp32 model in memory
        meta["test_accuracy"] = acc = accuracy(load_classifier(kind, path), xte, yte)
        checkpoint.save_fp16_with_sidecar(model.state_dict(), {"kind": kind}, path, kind, command, meta)
        print(f"{kind}: test accuracy {acc:.4f}, saved to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    run_main(main)
