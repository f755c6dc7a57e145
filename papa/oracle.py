"""Train the simulated user (oracle) and the independent evaluator classifier for a dataset.

    python -m papa.oracle --config configs/mnist.yaml [--which oracle|evaluator|both]

oracle:    the reference MNIST-example CNN, Adadelta, StepLR γ per epoch, dropout; inputs in [−1, 1].
evaluator: a batch-normalised VGG-style CNN, Adam, another seed: every papa metric is judged by it, never by the oracle.

With `<section>.reject: true` (the shipped configs) the classifier gets an 11th output, "not a member of any class":
each batch holds style-augmented real images (thin, bold, slanted, rotated, scaled, shifted, contrast:
`papa.negatives.augment_style`) with their class, and `negative_fraction` as many synthetic negatives with the reject
class, their kinds drawn from `negative_kinds` (default the shipped judges' six: noise blobs, blends of two images,
blurs, fragments, broken strokes, scribbles; `flat`, the saturated slab, is the seventh: `papa.negatives`), from a
generator of the section's own seed, so the oracle and the evaluator see different negatives. `<section>.init` starts
from a 10-class file (its head gains the reject row). After training, `reject_report` measures on held-out data what
the manifest ships: the rejected share of the real test images of every class, plain, thinned and thickened by a
pixel, and of held-out negatives of each kind built from test images. Reject training holds out 5,000 training images
and lowers the reject output's bias until at most 0.8 % of any class among them is rejected (`calibrate_reject`).

Each is saved in fp16 to `checkpoints.oracle` / `checkpoints.evaluator` with a JSON sidecar (sha256, command, config,
data digest, steps, test accuracy, reject report), also recorded in the manifest beside it.
`python -m papa.oracle --config … --eval-only` re-measures the saved files.
"""
from __future__ import annotations

import argparse
import json
import math
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
from papa.models.classifier import CLASSIFIERS, NUM_CLASSES, REJECT_CLASS, has_reject
from papa.data import to_model_range
from papa.negatives import DEFAULT_P, KIND_NAMES, THIN_MIN_INK, augment_style, make_negatives, negative_batch, thick, thin
from papa.metrics import accuracy
from papa.records import save_grid


def _widen_head(model: torch.nn.Module, sd: dict) -> dict:
    """A 10-class state dict fitted to `model`'s 11-output head: the class rows kept, the reject row zero with a bias
    of −2 (the reject class starts rare and is learnt from the negatives)."""
    sd = dict(sd)
    head = model.head_key
    want = model.state_dict()
    for name in ("weight", "bias"):
        k = f"{head}.{name}"
        if k in sd and sd[k].shape[0] == NUM_CLASSES and want[k].shape[0] == NUM_CLASSES + 1:
            extra = torch.full_like(sd[k][:1], -2.0 if name == "bias" else 0.0)
            sd[k] = torch.cat([sd[k], extra])
    return sd


def train_classifier(kind: str, tcfg, x: torch.Tensor, y: torch.Tensor,
                     init_sd: dict | None = None) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(tcfg.seed)
    gen = torch.Generator().manual_seed(tcfg.seed)
    neg_gen = torch.Generator().manual_seed(tcfg.seed * 1_000_003 + 7)   # the section's own negatives
    model = CLASSIFIERS[kind](num_classes=NUM_CLASSES + 1 if tcfg.reject else NUM_CLASSES)
    if init_sd is not None:
        model.load_state_dict(_widen_head(model, init_sd))
    opt = (torch.optim.Adadelta(model.parameters(), lr=tcfg.lr) if kind == "oracle"
           else torch.optim.Adam(model.parameters(), lr=tcfg.lr))
    per_epoch = -(-len(x) // tcfg.batch_size)
    if tcfg.reject:   # a cosine decay to zero over every step: the reject boundary settles at a small lr
        total = tcfg.epochs * per_epoch
        step_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
        sched = None
    else:             # the from-scratch schedules, stepped per epoch
        step_sched = None
        sched = (torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=tcfg.gamma) if kind == "oracle"
                 else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tcfg.epochs))
    steps = 0
    for epoch in range(tcfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        bar = tqdm(range(0, len(x), tcfg.batch_size), desc=f"{kind} epoch {epoch + 1}/{tcfg.epochs}", dynamic_ncols=True)
        for i in bar:
            idx = perm[i:i + tcfg.batch_size]
            xb, yb = x[idx], y[idx]
            if tcfg.reject:
                m = max(1, round(len(idx) * tcfg.negative_fraction))
                src = torch.randint(0, len(x), (m,), generator=neg_gen)
                neg, _ = negative_batch(x[src], y[src], neg_gen, kinds=tcfg.negative_kinds)
                xb = torch.cat([reject_style(xb, gen), neg])
                yb = torch.cat([yb, torch.full((m,), REJECT_CLASS, dtype=yb.dtype)])
            loss = F.nll_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step_sched is not None:
                step_sched.step()
            steps += 1
            if steps % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if sched is not None:
            sched.step()
    return model.eval(), steps


def legible_variants(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real images as they are, thinned by a pixel (the cross erosion, capped to keep `THIN_MIN_INK` of the ink: a
    full erosion erases thin strokes) and thickened by a pixel (the full cross dilation): all must be accepted."""
    return x, thin(x, 1.0, min_ink=THIN_MIN_INK), thick(x, 1.0)


# reject training's style augmentation: the stroke width changes as `legible_variants` makes them (a bold digit is the
# real image most like a blend or a blur, so it is seen often, and at full strength), then papa.negatives' geometry
# and contrast augmentations
THICK_P, THIN_P = 0.3, 0.2
REJECT_STYLE_P = {**DEFAULT_P, "thin": 0.0, "thick": 0.0}


def reject_style(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Real images for reject training: thickened by up to a pixel (THICK_P; half of them by a full pixel) or thinned
    (THIN_P, capped as `legible_variants`), then slanted, rotated, scaled, shifted and re-contrasted
    (`augment_style`)."""
    n = len(x)
    u, full, s = torch.rand(n, generator=gen), torch.rand(n, generator=gen) < 0.5, 0.5 + 0.5 * torch.rand(n, generator=gen)
    s = torch.where(full, torch.ones_like(s), s)
    pick = lambda m: m.view(-1, 1, 1, 1)
    x = torch.where(pick(u < THICK_P), thick(x, s), torch.where(pick(u < THICK_P + THIN_P),
                                                                 thin(x, s, min_ink=THIN_MIN_INK), x))
    return augment_style(x, gen, REJECT_STYLE_P)
CALIBRATION_SIZE = 5000         # training images held out of reject training to calibrate its threshold on
CALIBRATION_TARGET = 0.008      # the most any class's held-out real images may be rejected (plain, thinned, thickened)


@torch.no_grad()
def calibrate_reject(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     target: float = CALIBRATION_TARGET) -> float:
    """Lower the reject output's bias (never raise it) until at most `target` of every class's images in (x, y),
    real images held out of training, are rejected, plain, thinned and thickened (`legible_variants`): the reject
    decision is the argmax, so this moves its threshold. Returns the shift applied (≤ 0)."""
    worst = -math.inf
    for images in legible_variants(x):
        logits = torch.cat([net(images[i:i + 1000]) for i in range(0, len(images), 1000)])
        margin = logits[:, REJECT_CLASS] - logits[:, :REJECT_CLASS].max(1).values     # > 0: rejected
        worst = max([worst] + [float(torch.quantile(margin[y == c], 1 - target))
                               for c in range(NUM_CLASSES) if (y == c).any()])
    shift = min(0.0, -worst - 1e-4)
    getattr(net, net.head_key).bias.data[REJECT_CLASS] += shift
    return shift


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    net.eval()
    return torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


REPORT_SEED = 20_261_201         # held-out negatives: a seed no training run draws from
REPORT_NEGATIVES = 2000          # test images each negative kind is built from


@torch.no_grad()
def reject_report(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """What a reject-aware classifier is shipped with, on held-out data (x, y: the test split in [−1, 1]): the
    rejected share of the real test images of each class, plain, thinned by a pixel (the cross erosion, capped to keep
    `THIN_MIN_INK` of the ink: a full erosion erases thin strokes) and thickened by a pixel (the full cross dilation);
    each kind of negative built from `REPORT_NEGATIVES` test images; and the accuracy over the classes."""
    out: dict = {}
    pred = predict(net, x)
    out["test_accuracy"] = float((pred == y).float().mean())
    for name, images in zip(("real", "thinned", "thickened"), legible_variants(x)):
        rej = (predict(net, images) == REJECT_CLASS).float()
        per = [float(rej[y == c].mean()) for c in range(NUM_CLASSES)]
        out[f"rejected_{name}"] = {"per_class": [round(v, 4) for v in per], "max": round(max(per), 4),
                                   "all": round(float(rej.mean()), 4)}
    gen = torch.Generator().manual_seed(REPORT_SEED)
    pick = torch.randperm(len(x), generator=gen)[:REPORT_NEGATIVES]
    out["rejected_negatives"] = {}
    for kind in KIND_NAMES:
        neg = make_negatives(x[pick], kind, gen, y[pick])
        out["rejected_negatives"][kind] = round(float((predict(net, neg) == REJECT_CLASS).float().mean()), 4)
    out["rejected_negatives_min"] = min(out["rejected_negatives"].values())
    return out


@torch.no_grad()
def reject_mistakes(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """What `reject_report` counts against the classifier, as images: the real test images it rejects
    (`rejected_real`), and for each kind the held-out negatives it accepts (`accepted_<kind>`)."""
    out = {"rejected_real": x[predict(net, x) == REJECT_CLASS]}
    gen = torch.Generator().manual_seed(REPORT_SEED)
    pick = torch.randperm(len(x), generator=gen)[:REPORT_NEGATIVES]
    for kind in KIND_NAMES:
        neg = make_negatives(x[pick], kind, gen, y[pick])
        out[f"accepted_{kind}"] = neg[predict(net, neg) != REJECT_CLASS]
    return out


def reject_lines(rep: dict) -> list[str]:
    """The report as the lines `papa.oracle` prints."""
    lines = [f"  test accuracy {rep['test_accuracy']:.4f}"]
    for name in ("real", "thinned", "thickened"):
        r = rep[f"rejected_{name}"]
        lines.append(f"  rejects {100 * r['all']:.2f} % of {name} test images (worst class {100 * r['max']:.2f} %)")
    lines.append("  rejects held-out negatives: " + ", ".join(f"{k} {100 * v:.1f} %"
                                                           for k, v in rep["rejected_negatives"].items()))
    return lines


def record_in_manifest(path: Path, kind: str, side: dict) -> None:
    """Copy a classifier's sidecar into the manifest beside it (`files.<kind>`), if there is one."""
    target = path.parent / "manifest.json"
    if not target.is_file():
        return
    manifest = json.loads(target.read_text(encoding="utf-8"))
    manifest.setdefault("files", {})[kind] = {**side, "size_bytes": path.stat().st_size}
    manifest.setdefault("quality", {})[f"{kind}_test_accuracy"] = side.get("test_accuracy")
    checkpoint.atomic_write_text(target, json.dumps(manifest, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.oracle", description=__doc__.splitlines()[0])
    add_config_args(ap)
    ap.add_argument("--which", choices=("oracle", "evaluator", "both"), default="both")
    ap.add_argument("--eval-only", action="store_true", help="measure the saved classifiers only (accuracy; with a "
                    "reject class, the reject report)")
    ap.add_argument("--grids", metavar="DIR", default="", help="with --eval-only and a reject class: write DIR/<kind>_"
                    "rejected_real.png (test images it rejects) and DIR/<kind>_accepted_<negative>.png (held-out "
                    "negatives it accepts)")
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
            net = load_classifier(kind, path)
            if has_reject(net):
                print(f"{kind} ({path}):\n" + "\n".join(reject_lines(reject_report(net, xte, yte))))
                if args.grids:
                    for name, images in reject_mistakes(net, xte, yte).items():
                        if len(images):
                            save_grid(images[:100], Path(args.grids) / f"{kind}_{name}.png", nrow=10)
                    print(f"  grids of its mistakes in {args.grids}/")
            else:
                print(f"{kind}: test accuracy {accuracy(net, xte, yte):.4f} ({path})")
            continue
        t0 = time.time()
        tcfg = getattr(cfg, kind)
        init_sd, init_meta = None, {}
        if tcfg.init:
            init_sd = checkpoint.load_state_dict(tcfg.init, dataset=cfg.data.dataset)
            init_meta = {"init": {"file": tcfg.init, "sha256": checkpoint.sha256_file(tcfg.init)}}
        calib = {}
        if tcfg.reject:   # hold out the last CALIBRATION_SIZE training images (a fixed permutation) for calibration
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(tcfg.seed + 101))
            n_hold = min(CALIBRATION_SIZE, len(xtr) // 5)
            fit, hold = order[:-n_hold], order[-n_hold:]
            model, steps = train_classifier(kind, tcfg, xtr[fit], ytr[fit], init_sd)
            shift = calibrate_reject(model, xtr[hold], ytr[hold])
            calib = {"reject_calibration": {"held_out_train_images": n_hold, "target": CALIBRATION_TARGET,
                                            "bias_shift": round(shift, 4)}}
        else:
            model, steps = train_classifier(kind, tcfg, xtr, ytr, init_sd)
        command = (f"python -m papa.oracle --config {args.config} --which {kind}"
                   + "".join(f" --set {o}" for o in args.overrides))
        meta = {"config": {kind: to_dict(tcfg), "data": to_dict(cfg.data)}, **init_meta, **calib,
                "data_sha256": {"train_x": sha256_array(xtr_np), "train_y": sha256_array(ytr_np)},
                "training_steps": steps, "seconds": round(time.time() - t0, 1)}
        checkpoint.save_fp16_with_sidecar(model.state_dict(), {"kind": kind, "dataset": cfg.data.dataset}, path,
                                          kind, command, meta)
        # measure what was saved (fp16 weights), not the fp32 model in memory
        saved = load_classifier(kind, path)
        meta["test_accuracy"] = acc = accuracy(saved, xte, yte)
        lines = []
        if tcfg.reject:
            meta["reject_report"] = rep = reject_report(saved, xte, yte)
            meta["reject_report"]["command"] = f"python -m papa.oracle --config {args.config} --which {kind} --eval-only"
            lines = reject_lines(rep)
        side = checkpoint.save_fp16_with_sidecar(model.state_dict(), {"kind": kind, "dataset": cfg.data.dataset},
                                                 path, kind, command, meta)
        record_in_manifest(path, kind, side)
        print(f"{kind}: test accuracy {acc:.4f}, saved to {path} ({path.stat().st_size / 1e6:.2f} MB)")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    run_main(main)
