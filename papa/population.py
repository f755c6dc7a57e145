"""Online rounds for every user of a population, each aligning their own adapter on the one shared base model.

    torchrun -m papa.train --config configs/mnist_users.yaml            (users sharded over the ranks)
    python -m papa.train --config configs/mnist.yaml --set users.population=configs/users_mnist.yaml --set adapter.rank=2

With `users.population` set, papa.train runs the dataset's config once per user of the population file (papa/users.py;
the `new` users too when `users.include_new`; only the ids in `users.only` when it is set), one after another on each rank (rank r takes users r, r + world, …).
Each user's run is an ordinary papa run with an adapter (`adapter.rank` > 0), the user's classes as
`feedback.preference`, the user as the feedback source (`papa.users.SimulatedUser`: their classes, fine-grained
taste, label noise and skips) and its own directory `<run dir>/users/<id>/` (config.yaml, metrics, checkpoints with
the adapter alone, curves); a stopped population resumes user by user. Every user's run is computed alone (world size
1 inside it), so the sharding does not change any user's numbers. When all ranks are done, rank 0 writes
`population.md` and `population.json` (per user: the legible preferred rate for their classes, rejected rate,
precision, FID, labels, adapter size, peak memory; the median and spread) and `population.png` (every user's curve).
"""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from papa import checkpoint, dist
from papa.config import Config, ConfigError, dump_yaml


def users_of(cfg: Config):
    from papa.users import load_population
    pop = load_population(cfg.users.population)
    if cfg.users.only:
        return pop, [u for u in pop.users if u.id in cfg.users.only]
    return pop, [u for u in pop.users if cfg.users.include_new or not u.new]


def user_config(cfg: Config, spec) -> Config:
    """The user's run config: the population's, with their classes, noise and skips, and no population of its own."""
    c = copy.deepcopy(cfg)
    c.feedback.preference = list(spec.like)
    c.feedback.flip_prob, c.feedback.skip_below = spec.flip_prob, spec.skip_below
    c.feedback.reject = c.feedback.full_exploitation = True   # what papa.users.SimulatedUser does
    c.users.population = ""
    return c


def run_population(cfg: Config, run_dir: Path, rank: int, world: int, device, resume: bool,
                   force: bool = False) -> int:
    from papa.engine import Engine
    from papa.models import load_classifier
    from papa.users import SimulatedUser
    pop, users = users_of(cfg)
    started = [u.id for u in users if checkpoint.round_files(run_dir / "users" / u.id / "checkpoints")]
    if started and not resume:
        raise ConfigError(f"{run_dir} already holds a population run ({len(started)} users started, e.g. "
                          f"{started[0]!r}); continue it with --resume {run_dir}, or set another train.sample_path")
    for u in users:  # an edited population file must not quietly change a user half-way (or a finished one)
        f = run_dir / "users" / u.id / "user.json"
        if f.is_file() and json.loads(f.read_text()) != u.as_dict() and not force:
            raise ConfigError(f"user {u.id!r} of {pop.path} differs from the one {run_dir} was run with "
                              f"({f}); restore the population file, or pass --force to go on with the new one")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    oracle = load_classifier("oracle", cfg.checkpoints.oracle, cfg.data.dataset).to(device)
    judge = None
    for i in range(rank, len(users), world):
        spec = users[i]
        ucfg = user_config(cfg, spec)
        udir = run_dir / "users" / spec.id
        done = checkpoint.round_files(udir / "checkpoints")
        if done and done[-1][0] >= ucfg.train.rounds:
            print(f"[rank {rank}] {spec.id}: done already")
        else:
            print(f"[rank {rank}] user {i + 1}/{len(users)}: {spec.describe()}", flush=True)
            udir.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(udir / "user.json", json.dumps(spec.as_dict(), indent=1))
            feedback = SimulatedUser(oracle, spec, seed=ucfg.train.seed)
            engine = Engine.from_config(ucfg, udir, 0, 1, device, feedback=feedback)
            engine.run(resume=bool(done), force=force)
        if spec.attribute is not None and not (udir / "taste.json").is_file():
            judge = judge or TasteJudge(cfg, device)
            checkpoint.atomic_write_text(udir / "taste.json", json.dumps(judge.report(udir, spec)))
    dist.barrier(world)
    if rank == 0:   # every finished user of the population, also those a `users.only` run left out
        write_summary(cfg, run_dir, pop, [u for u in pop.users if cfg.users.include_new or not u.new
                                          or u.id in cfg.users.only])
    return 0


class TasteJudge:
    """Measures fine-grained users' tastes (`report`): `eval.num` images from the base and from a user's final model
    (the evaluation seed, so the same starting noise); on the images the evaluator calls legible members of the
    user's classes, the mean of the measurement; and the taste rate, the share of all images that are legible members
    of their classes and on their side of the threshold. Each rank measures its own users (kept as
    users/<id>/taste.json); the evaluator and the base's images are made once per rank, on first use."""

    def __init__(self, cfg: Config, device):
        from papa.models import load_classifier, load_unet
        from papa.schedule import NoiseSchedule
        self.cfg, self.device = cfg, device
        self.sched = NoiseSchedule.from_config(cfg.diffusion)
        self.ev = load_classifier("evaluator", cfg.checkpoints.evaluator, cfg.data.dataset).to(device)
        self.base = self.draw(load_unet(cfg.model, cfg.checkpoints.base, dataset=cfg.data.dataset))

    def draw(self, model) -> torch.Tensor:
        from papa.sampling import sample
        d, e = self.cfg.diffusion, self.cfg.eval
        return sample(model.to(self.device), self.sched, e.num, steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                      seed=e.seed, batch_size=e.batch_size, progress=False, device=self.device)

    def report(self, udir: Path, spec) -> dict:
        from papa.models import load_unet
        cfg = self.cfg
        ck = checkpoint.round_files(udir / "checkpoints")[-1][1]
        user = self.draw(load_unet(cfg.model, ck, dataset=cfg.data.dataset, adapter=cfg.adapter,
                                   base=cfg.checkpoints.base))
        row = {}
        for who, imgs in (("base", self.base), ("user", user)):
            with torch.no_grad():
                pred = self.ev(imgs.to(self.device)).argmax(1).cpu()
            liked = torch.isin(pred, torch.tensor(spec.like))
            v = spec.attribute.measure(imgs)
            row[f"{who}_mean"] = float(v[liked].mean()) if liked.any() else None
            row[f"{who}_taste_rate"] = float((liked & spec.attribute.likes(imgs)).float().mean())
        return row


def _final(rows: list[dict]) -> dict:
    ev = [r for r in rows if "legible_preferred_rate" in r]
    return ev[-1] if ev else {}


def write_summary(cfg: Config, run_dir: Path, pop, users) -> dict:
    """population.md / .json / .png from the users' run directories (the users that have one)."""
    out, curves, tastes = [], {}, {}
    for spec in users:
        f = run_dir / "users" / spec.id / "metrics.jsonl"
        ck = checkpoint.round_files(run_dir / "users" / spec.id / "checkpoints")
        if not f.is_file() or not ck or ck[-1][0] < cfg.train.rounds:
            continue   # only finished users: a user part-way would show an intermediate evaluation as final
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        last, first = _final(rows), rows[0]
        size = sum(v.numel() for v in checkpoint.load(ck[-1][1])["model"].values())
        out.append({"user": spec.id, "likes": list(spec.like),
                    "taste": spec.taste() or None,
                    "base_rate": first.get("legible_preferred_rate"), "rate": last.get("legible_preferred_rate"),
                    "rejected": last.get("rejected_rate"), "precision": last.get("precision"), "fid": last.get("fid_preferred"),
                    "base_fid": first.get("fid_preferred"), "labels": last.get("labels_used"), "adapter_numbers": size,
                    "peak_rss_mb": max((r.get("peak_rss_mb", 0.0) for r in rows), default=0.0)})
        tf = run_dir / "users" / spec.id / "taste.json"
        if tf.is_file():
            tastes[spec.id] = json.loads(tf.read_text())
        curves[spec.id] = [(r["labels_used"], r["legible_preferred_rate"]) for r in rows
                           if "legible_preferred_rate" in r]
    rates = [u["rate"] for u in out if u["rate"] is not None]
    summ = {"users": out, "tastes": tastes, "population": pop.path, "median_rate": statistics.median(rates) if rates else None,
            "min_rate": min(rates, default=None), "max_rate": max(rates, default=None),
            "adapter_rank": cfg.adapter.rank}
    checkpoint.atomic_write_text(run_dir / "population.json", json.dumps(summ, indent=1))
    fmt = lambda v, f="{:.3f}": "—" if v is None else f.format(v)  # noqa: E731
    lines = [f"# Population run: {len(out)} of {len(users)} users of {pop.path} finished", "",
             f"Median legible preferred rate {fmt(summ['median_rate'])} (range {fmt(summ['min_rate'])}–"
             f"{fmt(summ['max_rate'])}); adapter rank {cfg.adapter.rank}. The rate counts the user's classes (a "
             "fine-grained taste is not part of it).", "",
             "| user | likes | taste | base rate | rate | rejected | precision | FID (base) | labels | adapter numbers | "
             "peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in out:
        lines.append(f"| {u['user']} | {u['likes']} | {u['taste'] or '—'} | {fmt(u['base_rate'])} | {fmt(u['rate'])} | "
                     f"{fmt(u['rejected'])} | {fmt(u['precision'])} | {fmt(u['fid'], '{:.2f}')} "
                     f"({fmt(u['base_fid'], '{:.2f}')}) | {u['labels']} | {u['adapter_numbers']} | "
                     f"{u['peak_rss_mb']:.0f} |")
    if tastes:
        lines += ["", f"Fine-grained tastes ({cfg.eval.num} images each from the base and the user's final model, the "
                  "same starting noise): the measurement's mean on the legible members of the user's classes, and "
                  "the taste rate (legible, their classes and their side of the threshold).", "",
                  "| user | taste | mean: base → user | taste rate: base → user |", "|---|---|---|---|"]
        by_id = {u.id: u for u in users}
        for uid, t in tastes.items():
            lines.append(f"| {uid} | {by_id[uid].taste()} | {fmt(t['base_mean'])} → "
                         f"{fmt(t['user_mean'])} | {fmt(t['base_taste_rate'])} → {fmt(t['user_taste_rate'])} |")
    checkpoint.atomic_write_text(run_dir / "population.md", "\n".join(lines) + "\n")
    _plot(curves, run_dir / "population.png")
    return summ


def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for uid, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker=".", label=uid)
    ax.set_xlabel("labels from the user")
    ax.set_ylabel("legible preferred rate (their classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def check(cfg: Config) -> None:
    """What a population run needs, checked before any work (called from config validation)."""
    if not cfg.users.population:
        return
    from papa.users import load_population
    pop = load_population(cfg.users.population)
    if pop.dataset != cfg.data.dataset:
        raise ConfigError(f"config key 'users.population': {cfg.users.population} is a {pop.dataset} population, "
                          f"the config says data.dataset: {cfg.data.dataset}")
    unknown = [u for u in cfg.users.only if u not in {s.id for s in pop.users}]
    if unknown:
        raise ConfigError(f"config key 'users.only': {unknown[0]!r} is not a user of {cfg.users.population} (its "
                          f"users: {', '.join(s.id for s in pop.users[:4])}, …)")
    if cfg.adapter.rank <= 0:
        raise ConfigError("config key 'users.population' needs adapter.rank > 0: every user aligns their own adapter "
                          "on the shared base (e.g. --set adapter.rank=2)")
    from papa.algos import METHODS
    if METHODS[cfg.train.algo].feedback == "reward" and any(u.attribute is not None for u in pop.users):
        raise ConfigError(f"config key 'train.algo': {cfg.train.algo} learns from rewards, which carry no "
                          "fine-grained taste; use a method that asks for labels or pairs (papa, d3po, …) with "
                          f"{cfg.users.population}")
    if cfg.feedback.source != "oracle":
        raise ConfigError("config key 'users.population': the simulated users answer, so feedback.source must be "
                          "oracle")
