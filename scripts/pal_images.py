"""PAL on images: does one personalised preference model shared by a population beat one model for everyone and one
model per user, for the users it was trained on and for newcomers fitted from a few labels?

    .venv/bin/python scripts/pal_images.py [--population configs/users_mnist.yaml] [--seeds 0 1 2] [--k 2 4 8]

Images: real test images of the population's dataset (the first 2,000 are the images users label, the next 2,000
the held-out images every model is scored on), as features of the frozen base UNet (papa.select.unet_features: the
bottleneck at t = 200, pooled 3×3; 576 numbers). Every user answers as the population file says (papa.users: the
reject-aware oracle, label noise, unsure → skip); a model is scored against the user's noiseless judgement.

- seen users: each of the population's users not marked `new` labels `--seen-labels` images (a fresh draw per seed);
  PAL-B (papa.pal, K prototypes), the shared model (the same architecture with one user vector for everyone) and
  independent models (one logistic regression per user on the same features, papa.select.PreferenceModel) are fitted
  on those labels and scored on each user's held-out images.
- new users: each `new` user gives n = 1, 2, 5, 10, 20, 50 labels; PAL fits only their K mixture logits, the
  independent model fits a logistic regression from those n labels, the shared model is used as it is.

Scores, averaged over users: balanced accuracy of like / dislike (the mean of the accuracy on liked and on disliked
images, so that "dislike everything" scores 0.5 for a user who likes one class in ten) and pair accuracy (for
held-out pairs of one liked and one disliked image, how often the liked one scores higher: PAL's own measure).
Writes runs/pal/<dataset>/pal.md, pal.json and pal.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from papa.config import REPO_ROOT, ConfigError, load_config
from papa.data import load_dataset
from papa.models import load_classifier, load_unet
from papa.pal import PAL, fit, fit_user
from papa.schedule import NoiseSchedule
from papa.select import PreferenceModel, unet_features
from papa.users import SimulatedUser, load_population

N_LABEL, N_EVAL = 2000, 2000
NEW_LABELS = (1, 2, 5, 10, 20, 50)


def scores(p: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(balanced accuracy, pair accuracy) of p(like) against the noiseless likes `truth` (bool)."""
    pred = p > 0.5
    pos, neg = truth, ~truth
    if not pos.any() or not neg.any():
        return float("nan"), float("nan")
    bal = 0.5 * (pred[pos].float().mean() + (~pred[neg]).float().mean())
    diff = p[pos][:, None] - p[neg][None, :]        # every liked-disliked pair of the held-out images
    pair = (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()
    return float(bal), float(pair)


def independent(feats: torch.Tensor, y: torch.Tensor, l2: float, seed: int):
    """p(like) of a per-user logistic regression, or 'dislike everything' (p = 0) until it has a like and a dislike."""
    m = PreferenceModel.fit(feats, y, 1, l2, seed)
    return (lambda f: m.probs(f)[0]) if m is not None else (lambda f: torch.zeros(len(f)))


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", default="configs/users_mnist.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="numbers of prototypes to try")
    ap.add_argument("--seen-labels", type=int, default=50, help="labels per seen user")
    ap.add_argument("--dim", type=int, default=32, help="PAL's preference-space size d")
    ap.add_argument("--variants", nargs="+", default=["B"], choices=["A", "B"],
                    help="PAL-B (linear, cosine to a mixture of prototypes) and/or PAL-A (ideal point, distance)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/pal")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pop = load_population(REPO_ROOT / args.population if not Path(args.population).is_absolute()
                              else args.population)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    cfg = load_config(REPO_ROOT / "configs" / f"{pop.dataset}.yaml")
    out = REPO_ROOT / args.out / pop.dataset
    out.mkdir(parents=True, exist_ok=True)

    x, _ = load_dataset(pop.dataset, "test")
    x = torch.from_numpy(x[:N_LABEL + N_EVAL]).float().div(127.5).sub(1).unsqueeze(1)
    from papa.checkpoint import sha256_file
    base_file = REPO_ROOT / cfg.checkpoints.base
    cache = out / f"features_t{cfg.select.feature_t}_{sha256_file(base_file)[:12]}.pt"   # by what they depend on
    if cache.is_file():
        feats = torch.load(cache)
    else:
        t0 = time.time()
        unet = load_unet(cfg.model, base_file, dataset=pop.dataset).eval()
        feats = unet_features(unet, NoiseSchedule.from_config(cfg.diffusion), x, cfg.select.feature_t)
        torch.save(feats, cache)
        print(f"features of {len(x)} images: {time.time() - t0:.0f} s", flush=True)
    oracle = load_classifier("oracle", REPO_ROOT / cfg.checkpoints.oracle, pop.dataset)
    lab, ev = slice(0, N_LABEL), slice(N_LABEL, N_LABEL + N_EVAL)
    sims = {u.id: SimulatedUser(oracle, u, seed=i) for i, u in enumerate(pop.users)}
    truth = {uid: s.likes(x[ev]) for uid, s in sims.items()}
    print(" ".join(f"{uid}:{float(t.float().mean()):.2f}" for uid, t in truth.items()), "(liked share, held out)")

    res: dict = {"seen": {}, "new": {}, "params_per_user": {}, "population": str(args.population),
                 "seen_labels": args.seen_labels, "seeds": args.seeds}
    D = feats.shape[1]
    seen, new = pop.seen, pop.new
    for seed in args.seeds:
        # seen users: one draw of labelled images per user and seed, their noisy answers
        idx, ys, us = [], [], []
        for ui, u in enumerate(seen):
            i = torch.randperm(N_LABEL, generator=torch.Generator().manual_seed(seed * 1000 + ui))[:args.seen_labels]
            idx.append(i)
            ys.append(sims[u.id].answers(x[lab][i], round_idx=seed))
            us.append(torch.full((len(i),), ui))
        idx, ys, us = torch.cat(idx), torch.cat(ys), torch.cat(us)
        models = {}
        for v in args.variants:
            for k in args.k:
                m = PAL(D, len(seen), k=k, d=args.dim, seed=seed, variant=v)
                fit(m, feats[lab][idx], us, ys)
                models[f"PAL-{v} K={k}"] = m.eval()
        shared = PAL(D, 1, k=1, d=args.dim, seed=seed)
        fit(shared, feats[lab][idx], torch.zeros_like(us), ys)
        fe = feats[ev]
        for ui, u in enumerate(seen):
            row = {}
            with torch.no_grad():
                for name, m in models.items():
                    row[name] = scores(m.p_like(fe, torch.full((len(fe),), ui)), truth[u.id])
                row["shared"] = scores(shared.p_like(fe, torch.zeros(len(fe), dtype=torch.long)), truth[u.id])
            sel = us == ui
            row["independent"] = scores(independent(feats[lab][idx[sel]], ys[sel], cfg.select.l2, seed)(fe),
                                        truth[u.id])
            for name, sc in row.items():
                res["seen"].setdefault(name, {}).setdefault(str(seed), []).append(sc)
        # new users: n labels each, from the same images users label
        for ni, u in enumerate(new):
            perm = torch.randperm(N_LABEL, generator=torch.Generator().manual_seed(seed * 1000 + 500 + ni))
            y_all = sims[u.id].answers(x[lab][perm[:max(NEW_LABELS)]], round_idx=seed)
            for n in NEW_LABELS:
                f_n, y_n = feats[lab][perm[:n]], y_all[:n]
                row = {}
                with torch.no_grad():
                    row["shared"] = scores(shared.p_like(fe, torch.zeros(len(fe), dtype=torch.long)), truth[u.id])
                for name, m in models.items():
                    w = fit_user(m, f_n, y_n)
                    with torch.no_grad():
                        row[name] = scores(m.p_like(fe, torch.zeros(len(fe), dtype=torch.long), logits=w[None]),
                                           truth[u.id])
                row["independent"] = scores(independent(f_n, y_n, cfg.select.l2, seed)(fe), truth[u.id])
                for name, sc in row.items():
                    res["new"].setdefault(name, {}).setdefault(str(n), {}).setdefault(str(seed), []).append(sc)
        print(f"seed {seed} done", flush=True)
    res["params_per_user"] = {**{f"PAL-{v} K={k}": k for v in args.variants for k in args.k}, "shared": 0,
                              "independent": D + 1}
    res["shared_params"] = {f"PAL-{v} K={k}": D * args.dim + args.dim + k * (args.dim if v == "B" else D) + 2
                            for v in args.variants for k in args.k}
    (out / "pal.json").write_text(json.dumps(res, indent=1))
    write_report(res, out, pop)
    return 0


def per_seed(d: dict, j: int) -> list[float]:
    """Per seed, the mean over users of score j (0 balanced accuracy, 1 pair accuracy)."""
    return [statistics.mean(sc[j] for sc in v if sc[j] == sc[j]) for v in d.values()]


def write_report(res: dict, out: Path, pop) -> None:
    names = list(res["seen"])
    lines = [f"# PAL on images: {pop.dataset}, {len(pop.seen)} seen and {len(pop.new)} new users",
             "", f"`scripts/pal_images.py --population {res['population']} --seeds "
             f"{' '.join(map(str, res['seeds']))}`; mean ± std over seeds of the mean over users.", "",
             f"## Seen users ({res['seen_labels']} labels each)", "",
             "| model | parameters per user | balanced accuracy | pair accuracy |", "|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {res['params_per_user'][n]} | {mean_std(per_seed(res['seen'][n], 0))} | "
                     f"{mean_std(per_seed(res['seen'][n], 1))} |")
    lines += ["", "## New users, fitted from n labels: balanced accuracy (pair accuracy) on held-out images", "",
              "| model | " + " | ".join(f"{n} labels" for n in NEW_LABELS) + " |",
              "|---|" + "---|" * len(NEW_LABELS)]
    for n in names:
        cells = []
        for k in NEW_LABELS:
            d = res["new"][n][str(k)]
            cells.append(f"{mean_std(per_seed(d, 0))} ({statistics.mean(per_seed(d, 1)):.3f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    (out / "pal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for n in names:
        for j, a in enumerate(ax):
            m = [statistics.mean(per_seed(res["new"][n][str(k)], j)) for k in NEW_LABELS]
            s = [statistics.pstdev(per_seed(res["new"][n][str(k)], j)) for k in NEW_LABELS]
            a.errorbar(NEW_LABELS, m, yerr=s, marker="o", capsize=3, label=n)
    for a, t in zip(ax, ("balanced accuracy", "pair accuracy")):
        a.set_xscale("log")
        a.set_xlabel("labels from the new user")
        a.set_ylabel(t)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    fig.suptitle(f"PAL on {pop.dataset}: new users ({len(pop.new)}), mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(out / "pal.png", dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
