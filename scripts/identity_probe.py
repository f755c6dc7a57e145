"""At which noise level is a sample's class decided? (what ePAPA's `papa.epapa_k` leaves to the base model)

    .venv/bin/python scripts/identity_probe.py [--dataset mnist] [--num 200] [--repeats 3] [--ks 600 500 350 250 150]

ePAPA trains and steers only the steps t >= k; below k the frozen base model finishes the image. If a class is still
open below k, the policy cannot decide it, whatever the person's labels say. The probe draws `--num` samples from the
shipped base model with the dataset config's sampler and steps, keeps each trajectory's x at the first step below k,
finishes it `--repeats` more times from there with fresh noise (the base model, as ePAPA samples), and counts how
often the evaluator (reject-aware) puts a finish in another class than the first finish. The table gives that share
per class of the first finish and per k: the part of a class's identity that is decided below k.
"""
import argparse

import torch

from papa import ops
from papa.metrics import classify
from papa.models import load_classifier, shipped_base
from papa.models.classifier import NUM_CLASSES, REJECT_CLASS
from papa.sampling import sample_trajectories


@torch.no_grad()
def finish(unet, sched, x: torch.Tensor, ts: list[int], j: int, sampler: str, eta: float,
           gen: torch.Generator) -> torch.Tensor:
    """Run the sampler from x (at step j of ts) to the image with fresh noise from `gen`."""
    for i in range(j, len(ts)):
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        coef = sched.fused_coefficients(tt, torch.full_like(tt, t_prev), sampler, eta)
        z = torch.randn(x.shape, generator=gen) if t_prev >= 0 else torch.zeros_like(x)
        x, _, _ = ops.fused_step(x, unet(x, tt), z, coef)
    return x.clamp(-1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist"))
    ap.add_argument("--num", type=int, default=200, help="trajectories (default 200)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh finishes per trajectory and k (default 3)")
    ap.add_argument("--ks", type=int, nargs="+", default=[600, 500, 350, 250, 150], help="the k to probe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.num < 1 or args.repeats < 1 or any(k <= 0 for k in args.ks):
        ap.error("--num and --repeats must be >= 1 and every k > 0")
    torch.set_num_threads(args.threads)
    cfg, unet, sched = shipped_base(args.dataset)
    d = cfg.diffusion
    ev = load_classifier("evaluator", cfg.checkpoints.evaluator, dataset=args.dataset)
    tr = sample_trajectories(unet, sched, args.num, steps=d.sample_steps, sampler=d.sampler, eta=d.eta, seed=args.seed)
    ts = tr["t"].tolist()
    first = classify(ev, tr.images.clamp(-1, 1))[0].argmax(1)
    flips = {}
    gen = torch.Generator().manual_seed(args.seed + 1)
    for k in args.ks:
        j = next((i for i, t in enumerate(ts) if t < k), len(ts))
        other = torch.zeros(args.num)
        for _ in range(args.repeats):
            other += (classify(ev, finish(unet, sched, tr["x"][:, j], ts, j, d.sampler, d.eta, gen))[0].argmax(1)
                      != first).float()
        flips[k] = other / args.repeats
        print(f"k = {k}: finished from t = {ts[j] if j < len(ts) else 'the image'}", flush=True)
    print(f"\n{args.dataset}, {args.num} base samples, {args.repeats} finishes each; the share of finishes in another "
          "class than the first (a class's identity decided below k)\n")
    print("| first finish's class | samples | " + " | ".join(f"k = {k}" for k in args.ks) + " |")
    print("|---|---|" + "---|" * len(args.ks))
    for c in range(NUM_CLASSES + 1):
        m = first == c
        if m.any():
            name = "rejected (no class)" if c == REJECT_CLASS else str(c)
            print(f"| {name} | {int(m.sum())} | " + " | ".join(f"{float(flips[k][m].mean()):.2f}" for k in args.ks)
                  + " |")
    print("| all | " + f"{args.num} | " + " | ".join(f"{float(flips[k].mean()):.2f}" for k in args.ks) + " |")


if __name__ == "__main__":
    main()
