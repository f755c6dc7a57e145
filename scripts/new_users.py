"""Newcomers on a shared base: start a new user's adapter from a mixture of prototype adapters, weighted by PAL.

    .venv/bin/python scripts/new_users.py [--config configs/mnist_users.yaml] [--k 8] [--seed 0] [--threads 2]

Three steps, each kept on disk and skipped when done (a stopped run picks up where it was):

1. PAL-B (papa.pal) on the population's seen users: each labels `--seen-labels` real test images (the first 2,000),
   as papa.users simulates them; the features are the frozen base UNet's (papa.select.unet_features).
2. K prototype adapters: for prototype k, an ordinary adapter run (the config's recipe, `--proto-rounds` rounds)
   whose user is prototype k alone (papa.pal.PrototypeUser: likes what PAL's prototype k likes, if legible). Its
   evaluations count the classes prototype k likes on most real test images.
3. Every newcomer (`new: true` in the population file), two ways, both from the base model's samples:
   - mixture: the newcomer labels `--warmup` images drawn from the base; PAL fits only their K logits (fit_user);
     their adapter starts from Σ_k softmax(w)_k · prototype adapter k, cut to the adapter's rank by SVD
     (papa.adapters.UserAdapters.mix; `adapter.init`), then PAPA rounds until `--budget` labels in all;
   - scratch: the same recipe from the base (B = 0) for `--scratch-rounds` rounds.
   Both curves count every label the newcomer gave, the warm-up's included.

Writes <out>/<dataset>/new_users.md, new_users.json and new_users.png; every run's own directory (config, metrics,
checkpoints, curves) is under <out>/<dataset>/prototypes/ and newcomers/.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from papa import checkpoint
from papa.config import REPO_ROOT, ConfigError, config_hash, load_config, to_dict
from papa.data import DataError, load_dataset
from papa.models import load_adapter, load_classifier, load_unet
from papa.pal import PAL, PrototypeUser, fit, fit_user, prototype_logits
from papa.population import user_config
from papa.schedule import NoiseSchedule
from papa.select import unet_features
from papa.users import SimulatedUser, load_population

N_LABEL = 2000


def run(cfg, run_dir: Path, feedback) -> None:
    from papa.engine import Engine
    done = checkpoint.round_files(run_dir / "checkpoints")
    if done and done[-1][0] >= cfg.train.rounds:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    Engine.from_config(cfg, run_dir, 0, 1, torch.device("cpu"), feedback=feedback).run(resume=bool(done))


def curve(run_dir: Path, offset: int = 0) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["labels_used"] + offset, r["legible_preferred_rate"]) for r in rows if "legible_preferred_rate" in r]


def final_row(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "legible_preferred_rate" in r][-1]


def fit_pal(pop, x: torch.Tensor, feats: torch.Tensor, oracle, args) -> PAL:
    """PAL-B on the seen users' answers about the labelled images `x` (features `feats`)."""
    idx, ys, us = [], [], []
    for ui, u in enumerate(pop.seen):   # as scripts/pal_images.py draws them
        i = torch.randperm(N_LABEL, generator=torch.Generator().manual_seed(args.seed * 1000 + ui))[:args.seen_labels]
        idx.append(i)
        ys.append(SimulatedUser(oracle, u, seed=ui).answers(x[i], round_idx=args.seed))
        us.append(torch.full((len(i),), ui))
    idx, ys, us = torch.cat(idx), torch.cat(ys), torch.cat(us)
    model = PAL(feats.shape[1], len(pop.seen), k=args.k, d=args.dim, seed=args.seed)
    fit(model, feats[idx], us, ys)
    return model.eval()


def prototype_classes(model: PAL, k: int, feats: torch.Tensor, y: torch.Tensor) -> list[int]:
    """The classes whose real test images prototype k likes more often than not (the top one if none)."""
    with torch.no_grad():
        p = model.p_like(feats, torch.zeros(len(feats), dtype=torch.long), logits=prototype_logits(model, k))
    share = torch.stack([(p[y == c] > 0.5).float().mean() for c in range(10)])
    liked = [c for c in range(10) if share[c] > 0.5]
    return liked or [int(share.argmax())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO_ROOT / "configs" / "mnist_users.yaml"),
                    help="a population config (users.population; default configs/mnist_users.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--k", type=int, default=8, help="PAL prototypes, and prototype adapters")
    ap.add_argument("--dim", type=int, default=32, help="PAL's preference-space size d")
    ap.add_argument("--seen-labels", type=int, default=200, help="labels per seen user for PAL")
    ap.add_argument("--proto-rounds", type=int, default=10, help="rounds of each prototype adapter's run")
    ap.add_argument("--warmup", type=int, default=20, help="a newcomer's labels on base images that fit their PAL "
                    "weights")
    ap.add_argument("--budget", type=int, default=50, help="a newcomer's labels in all, on the mixture path")
    ap.add_argument("--scratch-rounds", type=int, default=10, help="rounds of the from-scratch adapter")
    ap.add_argument("--users", nargs="*", default=None, help="only these newcomers (ids)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/new_users")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.set)
        if not cfg.users.population or cfg.adapter.rank <= 0:
            raise ConfigError(f"{args.config} is not a population config with adapters (users.population, "
                              "adapter.rank > 0)")
        pop = load_population(cfg.users.population)
        spr = cfg.train.samples_per_round
        if args.warmup % spr or (args.budget - args.warmup) % spr or args.budget <= args.warmup:
            raise ConfigError(f"--warmup {args.warmup} and --budget {args.budget} must be multiples of "
                              f"train.samples_per_round ({spr}), budget > warm-up")
        if args.budget > args.scratch_rounds * spr or (
                (args.budget // spr) % cfg.eval.every and args.budget != args.scratch_rounds * spr):
            raise ConfigError(f"--budget {args.budget} must be a label count the from-scratch run evaluates at "
                              f"(every eval.every={cfg.eval.every} rounds of {spr}, up to --scratch-rounds "
                              f"{args.scratch_rounds})")
        unknown = sorted(set(args.users or []) - {u.id for u in pop.new})
        if unknown:
            raise ConfigError(f"--users: {unknown[0]!r} is no newcomer of {pop.path} (its newcomers: "
                              f"{', '.join(u.id for u in pop.new) or 'none'})")
        newcomers = [u for u in pop.new if args.users is None or u.id in args.users]
        if not newcomers:
            raise ConfigError(f"{pop.path} has no newcomers (users with new: true)")
        cfg.train.seed = args.seed
        return steps(cfg, pop, newcomers, args)
    except (ConfigError, checkpoint.CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")


SETTINGS = ("seed", "k", "dim", "seen_labels", "proto_rounds", "warmup", "budget", "scratch_rounds")


def steps(cfg, pop, newcomers, args) -> int:
    ds, t0, spr = pop.dataset, time.time(), cfg.train.samples_per_round
    out = Path(args.out) / ds
    made = {**{k: getattr(args, k) for k in SETTINGS}, "config": config_hash(cfg)}
    if (out / "args.json").is_file() and json.loads((out / "args.json").read_text()) != made:
        was = json.loads((out / "args.json").read_text())
        diff = [k for k in made if was.get(k) != made[k]]
        raise ConfigError(f"{out} holds runs made with other settings ({', '.join(diff)}: "
                          f"{', '.join(str(was.get(k)) for k in diff)}); rerun with those, or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(out / "args.json", json.dumps(made, indent=1))
    sched = NoiseSchedule.from_config(cfg.diffusion)
    base = load_unet(cfg.model, cfg.checkpoints.base, dataset=ds).eval()
    oracle = load_classifier("oracle", cfg.checkpoints.oracle, ds)

    # 1. PAL on the seen users
    x_test, y_test = load_dataset(ds, "test", root=cfg.data.root or None)
    x_lab = torch.from_numpy(x_test[:N_LABEL]).float().div(127.5).sub(1).unsqueeze(1)
    y_lab = torch.from_numpy(y_test[:N_LABEL]).long()
    feat_file = out / f"features_t{cfg.select.feature_t}_{checkpoint.sha256_file(cfg.checkpoints.base)[:12]}.pt"
    if feat_file.is_file():
        feats = torch.load(feat_file)
    else:
        feats = unet_features(base, sched, x_lab, cfg.select.feature_t)
        checkpoint.atomic_save(feats, feat_file)
    pal_file = out / f"pal_k{args.k}_seed{args.seed}_labels{args.seen_labels}.pt"
    pal = PAL(feats.shape[1], len(pop.seen), k=args.k, d=args.dim, seed=args.seed)
    if pal_file.is_file():
        pal.load_state_dict(torch.load(pal_file))
        pal.eval()
    else:
        pal = fit_pal(pop, x_lab, feats, oracle, args)
        checkpoint.atomic_save(pal.state_dict(), pal_file)
    print(f"PAL-B K={args.k} on {len(pop.seen)} seen users ({time.time() - t0:.0f} s)", flush=True)

    # 2. prototype adapters
    protos = {}
    for k in range(args.k):
        pcfg = copy.deepcopy(cfg)
        pcfg.users.population, pcfg.train.rounds = "", args.proto_rounds
        pcfg.feedback.preference = prototype_classes(pal, k, feats, y_lab)
        pdir = out / "prototypes" / f"proto_{k}"
        print(f"prototype {k}: likes mostly {pcfg.feedback.preference}", flush=True)
        run(pcfg, pdir, PrototypeUser(pal, k, base, sched, cfg.select.feature_t, oracle))
        protos[f"proto_{k}"] = {"classes": pcfg.feedback.preference, "dir": pdir,
                                "rate": final_row(pdir)["legible_preferred_rate"]}

    # 3. newcomers: from the PAL-weighted mixture, and from scratch
    from papa.adapters import UserAdapters
    from papa.sampling import sample
    mixer = UserAdapters(load_unet(cfg.model, cfg.checkpoints.base, dataset=ds), cfg.adapter, list(protos))
    for name, p in protos.items():
        mixer.load(name, load_adapter(checkpoint.round_files(p["dir"] / "checkpoints")[-1][1], cfg.adapter, ds))
    d, rows = cfg.diffusion, []
    for ni, u in enumerate(newcomers):
        udir = out / "newcomers" / u.id
        udir.mkdir(parents=True, exist_ok=True)
        mix_file = udir / "mixture.pt"
        if not mix_file.is_file():
            warm = sample(base, sched, args.warmup, steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                          seed=args.seed * 1000 + 700 + ni, progress=False)
            # the warm-up's label noise from a round index the runs never reach (round 1 has its own)
            answers = SimulatedUser(oracle, u, seed=args.seed).answers(warm, round_idx=1_000_000 + ni)
            w = fit_user(pal, unet_features(base, sched, warm, cfg.select.feature_t), answers)
            weights = dict(zip(protos, w.softmax(0).tolist()))
            checkpoint.atomic_save({"model": mixer.mix(weights), "dataset": ds, "weights": weights,
                                    "warmup_answers": answers,
                                    "adapter": {k: v for k, v in to_dict(cfg.adapter).items() if k != "init"}},
                                   mix_file)
        mix = checkpoint.load(mix_file)
        mcfg = user_config(cfg, u)
        mcfg.adapter.init, mcfg.train.rounds = str(mix_file.resolve()), (args.budget - args.warmup) // spr
        scfg = user_config(cfg, u)
        scfg.train.rounds = args.scratch_rounds
        print(f"newcomer {u.describe()}: mixture {', '.join(f'{k} {v:.2f}' for k, v in mix['weights'].items())}",
              flush=True)
        run(mcfg, udir / "mixture", SimulatedUser(oracle, u, seed=args.seed))
        run(scfg, udir / "scratch", SimulatedUser(oracle, u, seed=args.seed))
        rows.append({"user": u.id, "likes": list(u.like), "taste": u.taste() or None, "weights": mix["weights"],
                     "warmup_likes": int((mix["warmup_answers"] > 0).sum()),
                     "mixture": curve(udir / "mixture", offset=len(mix["warmup_answers"])),
                     "scratch": curve(udir / "scratch"),
                     "mixture_final": final_row(udir / "mixture")})
    report(rows, protos, args, out, cfg, time.time() - t0)
    return 0


def rate_at(c: list[tuple[int, float]], n: int) -> float | None:
    got = [r for labels, r in c if labels == n]
    return got[0] if got else None


def report(rows: list[dict], protos: dict, args, out: Path, cfg, seconds: float) -> None:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    at = args.budget
    for r in rows:
        r["mixture_at_budget"], r["scratch_at_budget"] = rate_at(r["mixture"], at), rate_at(r["scratch"], at)
        r["mixture_start"], r["base_rate"] = rate_at(r["mixture"], args.warmup), rate_at(r["scratch"], 0)
        goal = r["mixture_at_budget"]
        r["scratch_labels_to_match"] = next((n for n, v in r["scratch"] if goal is not None and v >= goal), None)
    def med(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None
    summ = {"k": args.k, "seed": args.seed, "warmup": args.warmup, "budget": at, "seen_labels": args.seen_labels,
            "proto_rounds": args.proto_rounds, "scratch_rounds": args.scratch_rounds,
            "prototypes": {k: {"classes": p["classes"], "rate": p["rate"]} for k, p in protos.items()},
            "median_mixture_at_budget": med("mixture_at_budget"), "median_scratch_at_budget": med("scratch_at_budget"),
            "median_base": med("base_rate"), "median_mixture_start": med("mixture_start"), "users": rows,
            "seconds": seconds}
    checkpoint.atomic_write_text(out / "new_users.json", json.dumps(summ, indent=1))
    lines = [f"# Newcomers from a PAL-weighted mixture of {args.k} prototype adapters, against from scratch", "",
             f"Seed {args.seed}; PAL-B K={args.k} on {args.seen_labels} labels per seen user; prototype adapters "
             f"{args.proto_rounds} rounds each; a newcomer's first {args.warmup} labels (on base images) fit their "
             f"weights, then PAPA rounds to {at} labels in all. Median legible preferred rate at {at} labels: mixture "
             f"{fmt(summ['median_mixture_at_budget'])}, from scratch {fmt(summ['median_scratch_at_budget'])} (base "
             f"{fmt(summ['median_base'])}, the mixture before any update {fmt(summ['median_mixture_start'])}). "
             f"{seconds / 60:.0f} min in all.", "",
             "| prototype | likes mostly | its own rate |", "|---|---|---|"]
    lines += [f"| {k} | {p['classes']} | {fmt(p['rate'])} |" for k, p in protos.items()]
    lines += ["", f"| newcomer | likes | base | mixture at {args.warmup} (no update) | mixture at {at} | scratch at {at} "
              f"| scratch at {args.scratch_rounds * cfg.train.samples_per_round} | labels scratch needs for the "
              f"mixture's {at}-label rate | top weights |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = sorted(r["weights"].items(), key=lambda kv: -kv[1])[:2]
        lines.append(f"| {r['user']} | {r['likes']}{' ' + r['taste'] if r['taste'] else ''} | {fmt(r['base_rate'])} | "
                     f"{fmt(r['mixture_start'])} | {fmt(r['mixture_at_budget'])} | {fmt(r['scratch_at_budget'])} | "
                     f"{fmt(r['scratch'][-1][1] if r['scratch'] else None)} | "
                     f"{r['scratch_labels_to_match'] if r['scratch_labels_to_match'] is not None else '> run'} | "
                     f"{', '.join(f'{k} {v:.2f}' for k, v in top)} |")
    checkpoint.atomic_write_text(out / "new_users.md", "\n".join(lines) + "\n")
    plot(rows, out / "new_users.png", args.budget)


def plot(rows: list[dict], path: Path, budget: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rows)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((n + cols - 1) // cols)),
                             squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, rows):
        ax.plot(*zip(*r["scratch"]), marker="o", label="from scratch")
        ax.plot(*zip(*r["mixture"]), marker="s", label="PAL mixture")
        ax.axvline(budget, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{r['user']} {r['likes']}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("labels from the newcomer")
    fig.supylabel("legible preferred rate")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
