"""Which space and bandwidth let PAPA's balanced likes (`papa.liked_balance`) undo a liked class taking over.

    .venv/bin/python scripts/balance_probe.py [--dataset mnist] [--threads 2]

Real test images stand in for a run's liked images. For each preference set of configs/preference_sets.yaml, a pool
of 150 liked images is drawn with one liked class taking over (half the pool, of a pair three quarters; the others
share the rest evenly), as the runs of the default showed (docs/ALIGNMENT.md). Each liked image gets PAPA's weight
(papa.algos.papa.liked_weights: inverse Gaussian-kernel density among the pool raised to a power, bandwidth f × the
median distance, mean 1, clipped at 3) in one of three spaces: pixels (the weighting as first shipped), or the frozen
base UNet's bottleneck at `--t` (pooled 3 × 3, one shared noise draw: the selectors' features), raw or standardised
per dimension over the pool; power 1 and 2. Each cell gives the weight share of the class that took over (its count
share is 0.50, of a pair 0.75; an even share is 1 / the number of liked classes) / the smallest liked class's share,
per space and f, mean over every class of the set taking over in turn and 3 draws. Weights that undo the takeover
bring the first number to 1 / n without starving the second.

With `--ratio` it measures the base-ratio weights instead (`papa.base_ratio`, papa.algos.papa.base_ratio_weights) on
the UNet features: test images 0–199 stand for the base model's samples, and a policy set of 100 others (80 % liked,
one liked class holding half the liked, of a pair three quarters; 20 % the other classes evenly) both for the
policy's recent samples and for the round whose liked images are weighted; per bandwidth f and power g, the same two
numbers, mean over every liked class taking over in turn and 3 draws.
"""
import argparse

import torch

from papa.algos.papa import balance_features, base_ratio_weights, liked_weights
from papa.config import preference_sets
from papa.data import model_images
from papa.models import shipped_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist"))
    ap.add_argument("--t", type=int, default=200, help="noise step of the UNet features (default 200)")
    ap.add_argument("--pool", type=int, default=150, help="liked images in a pool (default 150)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", action="store_true", help="measure the base-ratio weights (papa.base_ratio) instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, unet, sched = shipped_base(args.dataset)
    x, y = model_images(args.dataset, "test", 3000)
    uf = balance_features(unet, sched, x, args.t)
    if args.ratio:
        return ratio_probe(args.dataset, uf, y)
    spaces = {"pixels": (x.flatten(1), False, 1.0), f"UNet t={args.t}": (uf, False, 1.0),
              f"UNet t={args.t}, standardised": (uf, True, 1.0), "pixels, power 2": (x.flatten(1), False, 2.0),
              f"UNet t={args.t}, power 2": (uf, False, 2.0)}
    sets = {n: p for n, (p, _) in preference_sets(args.dataset).items()}
    fs = (0.2, 0.3, 0.4, 0.6, 1.0)
    print("\n| set | even share | space | " + " | ".join(f"f = {f}" for f in fs) + " |")
    print("|---|---|---|" + "---|" * len(fs))
    for name, pref in sets.items():
        if len(pref) < 2:
            continue  # one liked class: nothing to balance
        n = len(pref)
        top_share = max(0.5, 1.5 / n)  # a pair: 3 to 1
        for sname, (feats, std, power) in spaces.items():
            cells = []
            for f in fs:
                top, low = [], []
                for big in pref:
                    for s in range(3):
                        counts = {c: round(args.pool * top_share) if c == big else
                                  round(args.pool * (1 - top_share) / (n - 1)) for c in pref}
                        idx = draw(y, torch.arange(len(y)), counts, s)
                        p = feats[idx]
                        w = liked_weights(p, torch.ones(len(p)), p, f, standardise=std, power=power)
                        shares(w, y[idx], pref, big, top, low)
                cells.append(f"{sum(top) / len(top):.2f} / {sum(low) / len(low):.2f}")
            print(f"| {name} {pref} | {1 / n:.2f} | {sname} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: weight share of the class that took over (count share 0.50, of a pair 0.75)"
          " / the smallest liked class's share")


def draw(y: torch.Tensor, ids: torch.Tensor, counts: dict[int, int], seed: int) -> torch.Tensor:
    """counts[c] images of each class c drawn from `ids` without replacement (seeded), in class order."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c, k in counts.items():
        members = ids[y[ids] == c]
        out.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(out)


def shares(w: torch.Tensor, cls: torch.Tensor, pref: list[int], big: int, top: list, low: list) -> None:
    """Append the weight share of the class that took over, and the smallest liked class's, to `top` and `low`."""
    share = torch.stack([w[cls == c].sum() for c in pref]) / w.sum()
    top.append(float(share[pref.index(big)]))
    low.append(float(share.min()))


def ratio_probe(dataset: str, uf: torch.Tensor, y: torch.Tensor) -> None:
    settings = ((0.3, 1.0), (0.5, 1.0), (0.3, 2.0), (0.5, 2.0), (0.3, 3.0), (0.5, 3.0))
    base, rest = torch.arange(200), torch.arange(1000, 3000)
    print("\n| set | even share | " + " | ".join(f"f = {f}, g = {g:g}" for f, g in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for name, (pref, _) in preference_sets(dataset).items():
        n = len(pref)
        if n < 2:
            continue  # one liked class: nothing to balance
        top_share = max(0.5, 1.5 / n)
        cells = []
        for f, g in settings:
            top, low = [], []
            for big in pref:
                for s in range(3):
                    counts = {c: round(100 * (0.8 * (top_share if c == big else (1 - top_share) / (n - 1))
                                              if c in pref else 0.2 / (10 - n))) for c in range(10)}
                    pol = draw(y, rest, counts, s)
                    lab = torch.where(torch.isin(y[pol], torch.tensor(pref)), 1.0, -1.0)
                    w = base_ratio_weights(uf[pol], lab, uf[base], uf[pol], f, power=g)
                    liked = lab > 0
                    shares(w[liked], y[pol][liked], pref, big, top, low)
            cells.append(f"{sum(top) / len(top):.2f} / {sum(low) / len(low):.2f}")
        print(f"| {name} {pref} | {1 / n:.2f} | " + " | ".join(cells) + " |", flush=True)
    print("\ncells: weight share of the liked class that took over (count share 0.50, of a pair 0.75)"
          " / the smallest liked class's share")


if __name__ == "__main__":
    main()
