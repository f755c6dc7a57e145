"""How well the selectors' preference model can tell a person's liked classes from the rest, per feature choice.

    .venv/bin/python scripts/preference_model_probe.py [--dataset mnist] [--threads 2]

Real test images stand in for a round's pool: for each preference set of configs/preference_sets.yaml (its tuned and
held-out sets) and each feature choice (the frozen base UNet's bottleneck at a few noise steps, pooled to 1×1 or
3×3, and raw pixels at 14×14), the one-member preference model (papa.select.PreferenceModel) is fitted on 30 and on
100 labelled images (the class labels turned into likes) and scored on 200 others; mean accuracy over 3 draws. This
chose select.feature_t and the 3×3 pooling.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from papa.config import preference_sets
from papa.data import model_images
from papa.models import shipped_base
from papa.select import PreferenceModel, unet_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, unet, sched = shipped_base(args.dataset)
    x, y = model_images(args.dataset, "test", 1200)
    feats = {}
    for t in (50, 200, 400):
        for pool in (1, 3):
            t0 = time.time()
            feats[f"UNet t={t}, {pool}x{pool}"] = unet_features(unet, sched, x, t, pool=pool)
            print(f"features t={t} {pool}x{pool}: {time.time() - t0:.1f} s for {len(x)} images", flush=True)
    feats["pixels 14x14"] = F.avg_pool2d(x, 2).flatten(1)
    sets = {n: p for n, (p, _) in preference_sets(args.dataset).items()}
    print("\n| set | features | dims | accuracy, 30 labels | accuracy, 100 labels |\n|---|---|---|---|---|")
    for name, pref in sets.items():
        like = torch.where(torch.isin(y, torch.tensor(pref)), 1.0, -1.0)
        for fname, f in feats.items():
            res = []
            for n in (30, 100):
                accs = []
                for s in range(3):
                    idx = torch.randperm(1000, generator=torch.Generator().manual_seed(s))[:n]
                    m = PreferenceModel.fit(f[idx], like[idx], 1, cfg.select.l2, s)
                    if m is not None:
                        p = m.probs(f[1000:]).mean(0)
                        accs.append(float(((p > 0.5) == (like[1000:] > 0)).float().mean()))
                res.append(sum(accs) / len(accs) if accs else float("nan"))
            print(f"| {name} {pref} | {fname} | {f.shape[1]} | {res[0]:.3f} | {res[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
