"""How well does each estimate of p_base(x) / p_policy(x) see a liked class the policy over-draws? (`papa.base_ratio`)

    .venv/bin/python scripts/ratio_probe.py RUN_DIR [--round N] [--num 300] [--steps 40] [--threads 1]

`papa.base_ratio` weights each liked sample by an estimate of p_base(x) / p_policy(x), so that training on the
policy's liked samples targets the base model's liked samples (its class proportions) instead of the policy's own. The
probe draws `--num` samples from a run's policy (the round checkpoint's evaluated weights, ePAPA's k from the run's
config) and as many from the frozen base model, puts each in a class with the evaluator, and compares, per class, the
true ratio of the class shares (base share / policy share) with two estimates of the per-sample ratio:

- `kde`: the shipped estimator, Gaussian kernel densities on the base UNet's features (`base_ratio_weights`, the run's
  bandwidth; the base set the probe's base samples, the policy set its policy samples);
- `elbo`: the difference of the two models' evidence lower bounds, log p_base(x) − log p_policy(x) ≈
  Σ_{t ≥ k} (λ_t / 2) · D · (mse(ε_policy(x_t, t), ε) − mse(ε_base(x_t, t), ε)), D the pixels per image, on `--steps`
  stratified steps of t ≥ k with one noise draw per sample shared by both models (`papa.algos.papa.elbo_log_ratio`).

For each estimate and power (`--powers`) it prints the share of the weight each liked class gets over the policy's
liked samples (normalised to mean 1 and clipped at 3, as in training), beside the policy's own shares (`none`) and
the base's shares of its liked samples, and each column's total variation from the base's: an estimate that sees
the over-drawn class brings its share toward the base's. It also prints how well two independent ELBO estimates
of the same samples agree (their correlation), a measure of the estimate's noise.
"""
import argparse
from pathlib import Path

import torch

from papa import checkpoint
from papa.algos.papa import balance_features, base_ratio_weights, elbo_log_ratio, papa_weights, tempered_weights
from papa.cli import run_main
from papa.config import ConfigError, load_config
from papa.metrics import classify
from papa.models import load_classifier, load_unet
from papa.sampling import sample
from papa.schedule import NoiseSchedule


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run directory (its config.yaml and checkpoints/round_NNN.pt)")
    ap.add_argument("--round", type=int, default=None, help="the round checkpoint (default: the newest)")
    ap.add_argument("--num", type=int, default=300, help="samples from the policy and from the base (default 300)")
    ap.add_argument("--steps", type=int, default=40, help="stratified steps of the ELBO difference (default 40)")
    ap.add_argument("--powers", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="weight = ratio^power")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.num < 2 or args.steps < 1:
        ap.error("--num must be >= 2 and --steps >= 1")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    rounds = checkpoint.round_files(run / "checkpoints")
    if not rounds:
        raise ConfigError(f"{run}: no checkpoints/round_NNN.pt; pass a run directory that kept its round checkpoints")
    if args.round is not None and args.round not in dict(rounds):
        raise ConfigError(f"--round {args.round}: {run}/checkpoints has rounds {[r for r, _ in rounds]}; pass one of them")
    path = dict(rounds)[args.round] if args.round is not None else rounds[-1][1]
    ds, d, s = cfg.data.dataset, cfg.diffusion, cfg.methods["papa"]
    base = load_unet(cfg.model, cfg.checkpoints.base, dataset=ds).eval()
    policy = load_unet(cfg.model, cfg.checkpoints.base, dataset=ds).eval()
    policy.load_state_dict(checkpoint.load_state_dict(path, "auto", dataset=ds))
    sched = NoiseSchedule.from_config(d)
    ev = load_classifier("evaluator", cfg.checkpoints.evaluator, dataset=ds)
    kw = dict(steps=d.sample_steps, sampler=d.sampler, eta=d.eta, progress=False)
    xp = sample(policy, sched, args.num, seed=args.seed, base_model=base, epapa_k=s.epapa_k, **kw)
    xb = sample(base, sched, args.num, seed=args.seed + 1, **kw)
    cp, cb = (classify(ev, x)[0].argmax(1) for x in (xp, xb))
    lam = papa_weights(sched, s.t0_weight, s.weighting)
    gen = torch.Generator().manual_seed(args.seed + 2)
    log_r = elbo_log_ratio(policy, base, sched, xp, lam, s.epapa_k, args.steps, gen)
    log_r2 = elbo_log_ratio(policy, base, sched, xp, lam, s.epapa_k, args.steps, gen)   # the same draw, new noise
    fb = balance_features(base, sched, xb, s.balance_t)
    fp = balance_features(base, sched, xp, s.balance_t)
    liked_classes = list(cfg.feedback.preference)
    lp = torch.isin(cp, torch.tensor(liked_classes))
    lb = torch.isin(cb, torch.tensor(liked_classes))
    rep = torch.corrcoef(torch.stack([log_r[lp], log_r2[lp]]))[0, 1]
    print(f"{path}: {args.num} policy samples (k = {s.epapa_k}), {args.num} base samples, of which "
          f"{int(lp.sum())} and {int(lb.sum())} in a liked class {liked_classes}. ELBO log-ratio on {args.steps} "
          f"steps, liked samples: mean {float(log_r[lp].mean()):+.2f}, sd {float(log_r[lp].std()):.2f}; two "
          f"independent estimates correlate {float(rep):.2f}\n")
    y = lp.double() * 2 - 1            # the policy's liked samples are what the weights apply to
    cols = {"none": torch.ones(args.num, dtype=torch.float64)}
    for g in args.powers:
        cols[f"kde^{g:g}"] = base_ratio_weights(fp, y, fb, fp, s.base_ratio_bandwidth, power=g)
        cols[f"elbo^{g:g}"] = tempered_weights(log_r, y, g)
    print("| liked class | base share | log(base / policy share) | mean ELBO log-ratio | "
          + " | ".join(f"{k}" for k in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    share = lambda w, c: float(w[lp & (cp == c)].sum() / w[lp].sum())
    tv = dict.fromkeys(cols, 0.0)
    for c in liked_classes:
        sb = float((cb[lb] == c).float().mean())
        sp = float((cp[lp] == c).float().mean())
        lr = f"{torch.log(torch.tensor(sb / sp)).item():+.2f}" if sp > 0 and sb > 0 else "—"
        m = lp & (cp == c)
        mr = f"{float(log_r[m].mean()):+.2f}" if m.any() else "—"
        for k, w in cols.items():
            tv[k] += 0.5 * abs(share(w, c) - sb)
        print(f"| {c} | {sb:.3f} | {lr} | {mr} | " + " | ".join(f"{share(w, c):.3f}" for w in cols.values()) + " |")
    print("| total variation from the base | | | | " + " | ".join(f"{v:.3f}" for v in tv.values()) + " |")
    print("\n(columns after the fourth: each liked class's share of the weight over the policy's liked samples; "
          "none = the policy's own shares)")
    return 0


if __name__ == "__main__":
    run_main(main)
