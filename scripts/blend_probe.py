"""How much of each garment (or digit) shows in a blend, and what an evaluator rejects of it.

    .venv/bin/python scripts/blend_probe.py --dataset fashion_mnist [--evaluator FILE ...] [--threads 1]

Builds `blend` and `blend_apart` negatives (papa.negatives) from 2,000 test images (seed 1) and prints, per kind, the
quantiles of `stick_out` (the share of the less visible image's ink outside the other's silhouette, on the unshifted
sources) and, per evaluator (default: the config's), the share rejected overall, per stick-out bin and for the
class pairs rejected least (pairs with at least 15 blends).
"""
from __future__ import annotations

import argparse

import torch

from papa.config import load_config
from papa.data import load_dataset, to_model_range
from papa.models import load_classifier
from papa.negatives import REJECT_CLASS, _to_p, blend, blend_apart, stick_out
from papa.oracle import predict

BINS = ((0.0, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.5), (0.5, 1.01))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist", choices=("mnist", "fashion_mnist"))
    ap.add_argument("--evaluator", nargs="*", default=None, help="evaluator files (default: the config's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = args.evaluator or [load_config(f"configs/{args.dataset}.yaml").checkpoints.evaluator]
    x_np, y_np = load_dataset(args.dataset, "test")
    x, y = to_model_range(torch.from_numpy(x_np)), torch.from_numpy(y_np).long()
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(x), generator=g)[:2000]
    xs, ys, p = x[pick], y[pick], _to_p(x[pick])
    nets = {f: load_classifier("evaluator", f, args.dataset) for f in files}
    for fn in (blend, blend_apart):
        neg, info = fn(xs, g, ys, return_info=True)
        so = stick_out(p[info["src"]], p[info["partner"]])
        q = so.quantile(torch.tensor([0.05, 0.25, 0.5])).tolist()
        print(f"{fn.__name__}: stick-out 5 / 25 / 50 % quantiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}")
        ya, yb = ys[info["src"]], ys[info["partner"]]
        for f, net in nets.items():
            rej = predict(net, neg) == REJECT_CLASS
            bins = ", ".join(f"[{lo}, {hi}) {rej[(so >= lo) & (so < hi)].float().mean():.2f} "
                             f"(n {int(((so >= lo) & (so < hi)).sum())})" for lo, hi in BINS if ((so >= lo) & (so < hi)).any())
            pairs = []
            for i in range(10):
                for j in range(i + 1, 10):
                    m = ((ya == i) & (yb == j)) | ((ya == j) & (yb == i))
                    if m.sum() >= 15:
                        pairs.append((float(rej[m].float().mean()), i, j, int(m.sum())))
            worst = ", ".join(f"{i}+{j} {r:.2f} (n {n})" for r, i, j, n in sorted(pairs)[:5])
            print(f"  {f}: rejected {rej.float().mean():.3f}; by stick-out: {bins}; least rejected pairs: {worst}")


if __name__ == "__main__":
    main()
