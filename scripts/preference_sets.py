"""Run a dataset's default config on every preference set of configs/preference_sets.yaml, and report them.

    .venv/bin/python scripts/preference_sets.py run    --dataset mnist [--sets round single] [--seeds 0 1 2]
                                                       [--threads 2] [--out runs/preference_sets] [--set KEY=VALUE ...]
    .venv/bin/python scripts/preference_sets.py report --dataset mnist [--out runs/preference_sets] [--tag NAME]

`run` trains `python -m papa.train --config configs/<dataset>.yaml` once per set and seed, one after the other (time
them on an otherwise idle machine), into `<out>/<tag>/<dataset>/<set>_s<seed>/`; the config is the dataset's default,
changed only in `feedback.preference`, `train.seed` and any `--set` (a `--set` names a variant: give it its own
`--tag`). A finished run is skipped, a stopped one resumed. Its wall time is kept in `wall.json` beside it, and its
record (config, metrics, summary, wall time, first and last evaluation grids) under `--records`
(docs/results/preference_sets: committed; a run recorded there is not run again). `report --out
docs/results/preference_sets` makes the table from the records.

`report` writes `<out>/<tag>/<dataset>.md` (and `.json`): per set, the final evaluation over seeds (mean ± std and
the worst seed) of the legible preferred rate, the rejected rate, the smallest liked class's share, precision,
recall, FID and the wall time, beside the base model's (round 0) and the bounds each is held to, and
`<out>/<tag>/<dataset>_grids.png`: for each set, the base's evaluation samples beside the aligned model's (seed 0).

    .venv/bin/python scripts/preference_sets.py curves --dataset mnist --tags default40 pool_random pool_exploit [--sets ...]
                                                       [--labels 150] [--name selectors]

    .venv/bin/python scripts/preference_sets.py asked --dataset mnist --tag exploit_diversity

`asked` says what each run's user was asked about: the evaluator's class of every labelled image, among the likes
and among the dislikes, in the first and the second half of the rounds.

    .venv/bin/python scripts/preference_sets.py user RUN_DIR [--round 30]

    .venv/bin/python scripts/preference_sets.py calibration --dataset mnist --tags b150_random_epochs2_ratio
                                                            b150_thompson_epochs2_ratio [--name calibration]

`calibration` says how well the selectors' preference model foresaw the answers it had not yet seen: per variant,
over its runs' asked images, the share liked against the predicted p(like) in bins, the expected calibration error,
accuracy and Brier score (from each round's pool.json and labels.json, which records keep).

`user` says how a run's simulated user answers the base model's samples (or, with `--round`, a later evaluation's),
per class the evaluator puts them in, and which of them it likes under the run's preference.

`curves` sets variants (tags) side by side, up to `--labels` labels: per set, the legible preferred rate against
the labels used (mean and band of ± 1 std over seeds, one line per tag) in `<out>/<name>_<dataset>.png`, and in
`<out>/<name>_<dataset>.md` the rate at every evaluation, the labels until it first reaches the dataset's target
(interpolated between evaluations), the rejected rate, precision and FID at the last evaluation within the labels,
the preference model's accuracy on the answers it had not seen (active querying) and the seconds per round.

    .venv/bin/python scripts/preference_sets.py reach --dataset mnist --tags b150_random_epochs2_ratio
                                                      b150_thompson_epochs2_ratio [--sets ...] [--labels 150]

`reach` counts, per run, the labels to the first evaluation (within `--labels`) where the legible preferred rate
is at or above the dataset's target *and* every bound holds at that evaluation (each liked class ≥ half its fair
share; rejected, precision and FID within their factors of the run's round 0): no interpolation, since a bound is
only known at an evaluation. Per set and tag: the seeds that get there, and the mean labels to it with a run that
never does counted as `--labels` + 50 (so a variant cannot win by failing); `<out>/<name>_<dataset>.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from papa.checkpoint import atomic_write_bytes
from papa.config import PREFERENCE_SETS_FILE, preference_sets
# the bounds every set is held to (docs/ALIGNMENT.md): on the final evaluation, against the base's round 0
from papa.evaluation import BOUNDS, FID_MAX, PRECISION_MIN, REJECT_MAX, TARGET_RATE, bounds_met, within

ROOT = Path(__file__).resolve().parent.parent


def load_sets(dataset: str) -> dict[str, tuple[list[int], str]]:
    try:
        return preference_sets(dataset)
    except ValueError as e:
        sys.exit(f"error: {e}")


def run_dir(args, name: str, seed: int) -> Path:
    return Path(args.out) / args.tag / args.dataset / f"{name}_s{seed}"


def finished(d: Path) -> bool:
    return (d / "summary.md").is_file() and (d / "wall.json").is_file()


def cmd_run(args) -> int:
    sets = load_sets(args.dataset)
    names = args.sets or list(sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        sys.exit(f"error: unknown set(s) {unknown}; {PREFERENCE_SETS_FILE} has {list(sets)}")
    for seed in args.seeds:
        for name in names:
            d = run_dir(args, name, seed)
            rec = record_dir(args, name, seed)
            if rec is not None and finished(rec):
                print(f"recorded already: {rec}")
                continue
            if finished(d):
                print(f"done already: {d}")
                save_record(d, rec)
                continue
            cmd = [sys.executable, "-m", "papa.train", "--config", f"configs/{args.dataset}.yaml",
                   "--threads", str(args.threads),
                   "--set", f"feedback.preference={json.dumps(sets[name][0])}", "--set", f"train.seed={seed}",
                   "--set", f"train.output_dir={Path(args.out) / args.tag}", "--set", f"train.sample_path={d.name}"]
            for o in args.overrides:
                cmd += ["--set", o]
            if (d / "config.yaml").is_file():
                cmd += ["--resume", str(d)]
            print("$", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc != 0:
                sys.exit(f"error: the run for set {name} seed {seed} failed with exit code {rc}")
            prev = json.loads((d / "wall.json").read_text())["seconds"] if (d / "wall.json").is_file() else 0.0
            (d / "wall.json").write_text(json.dumps({"seconds": round(prev + time.perf_counter() - t0, 1),
                                                     "threads": args.threads}))
            save_record(d, rec)
    return 0


# A finished run's record: the small files `report` reads (papa.compare's RECORD_FILES, its first and last evaluation
# grids and wall.json), kept under `--records` (committed), so that a table can be made, and a set of runs finished,
# on another machine. `report --out <records>` reads them as it reads runs.
def record_dir(args, name: str, seed: int) -> Path | None:
    return Path(args.records) / args.tag / args.dataset / f"{name}_s{seed}" if args.records else None


def save_record(d: Path, rec: Path | None) -> None:
    if rec is None:
        return
    from papa.compare import RECORD_FILES, first_last_grids
    asked = [str(f.relative_to(d)) for pool in sorted(d.glob("rounds/*/pool.json"))
             for f in (pool, pool.with_name("labels.json"))]    # what the selector predicted and the person answered
    for n in [*RECORD_FILES, *first_last_grids(rows_of(d)), *asked, "wall.json"]:  # wall.json last: marks it finished
        if (d / n).is_file():
            atomic_write_bytes(rec / n, (d / n).read_bytes())
    print(f"recorded in {rec}", flush=True)


def rows_of(d: Path) -> list[dict]:
    return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "preferred_rate" in r]


def _ms(v: list[float], fmt: str = "{:.3f}") -> str:
    v = [x for x in v if isinstance(x, (int, float)) and math.isfinite(x)]
    if not v:
        return "n/a"
    return fmt.format(v[0]) if len(v) == 1 else f"{fmt.format(statistics.mean(v))} ± {fmt.format(statistics.stdev(v))}"


def cmd_report(args) -> int:
    sets = load_sets(args.dataset)
    base_dir = Path(args.out) / args.tag
    table, grids = [], []
    for name, (pref, group) in sets.items():
        runs = sorted((base_dir / args.dataset).glob(f"{name}_s*"), key=lambda p: int(p.name.rsplit("_s", 1)[1]))
        runs = [d for d in runs if finished(d)]
        if not runs:
            continue
        rows = [rows_of(d) for d in runs]
        first = [r[0] for r in rows]
        last = [r[-1] for r in rows]
        walls = [json.loads((d / "wall.json").read_text())["seconds"] for d in runs]
        b = first[0]                          # the base's round 0 (the same for every seed: a fixed eval seed)
        met = [bounds_met(m, b, len(pref), TARGET_RATE[args.dataset]) for m in last]
        ok = {k: all(m[k] for m in met) for k in BOUNDS}
        table.append({"set": name, "preference": pref, "group": group, "seeds": [int(d.name.rsplit("_s", 1)[1])
                      for d in runs], "base": {k: b.get(k) for k in ("legible_preferred_rate", "rejected_rate",
                      "min_liked_share", "precision", "recall", "fid_preferred")},
                      "final": [{k: m.get(k) for k in ("labels_used", "legible_preferred_rate", "rejected_rate",
                                "min_liked_share", "precision", "recall", "fid_preferred", "ink_drift",
                                "stroke_drift", "preferred_rate", "class_fraction")} for m in last],
                      "curves": [[(r["labels_used"], r["legible_preferred_rate"]) for r in rs] for rs in rows],
                      "every_bound": [all(v is not False for v in m.values()) for m in met],
                      "wall_seconds": walls, "meets": ok})
        grids.append((name, pref, group, runs[0]))
    if not table:
        sys.exit(f"error: no finished runs under {base_dir / args.dataset}; run them first")
    mark = lambda b: "yes" if b else "**no**"
    what = "the default config" if args.tag == "default" else \
        f"the variant `{args.tag}` (its settings: each run's config.yaml, the run command's `--set`s)"
    lines = [f"# {args.dataset}: {what} on every preference set", "",
             f"Runs: `scripts/preference_sets.py run --dataset {args.dataset}` (tag `{args.tag}`); this table: "
             f"`scripts/preference_sets.py report --dataset {args.dataset} --tag {args.tag}`. Final evaluation "
             "(500 fixed-seed samples, judged by the reject-aware evaluator) after 300 labels; mean ± std over seeds; "
             "base = the shipped base model (round 0). Bounds: legible preferred rate ≥ "
             f"{TARGET_RATE[args.dataset]}, smallest liked class ≥ half its fair share, rejected ≤ {REJECT_MAX}× the "
             f"base's, precision ≥ {PRECISION_MIN}× the base's, FID ≤ {FID_MAX}× the base's; a bound holds when every "
             "seed meets it.", "",
             "| set | preference | seeds | legible preferred (base → final) | worst seed | rejected (base → final) "
             "| smallest liked class | precision (base → final) | recall | FID (base → final) | wall (s) | meets "
             "rate / liked / rejected / precision / FID |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        f, b = t["final"], t["base"]
        col = lambda k: [m[k] for m in f]
        name = t["set"] + (" (tuned on)" if t["group"] == "tuned" else "")
        lines.append(
            f"| {name} | {t['preference']} | {len(t['seeds'])} | {b['legible_preferred_rate']:.3f} → "
            f"{_ms(col('legible_preferred_rate'))} | {min(col('legible_preferred_rate')):.3f} | "
            f"{b['rejected_rate']:.3f} → {_ms(col('rejected_rate'))} | {_ms(col('min_liked_share'))} | "
            f"{b['precision']:.3f} → {_ms(col('precision'))} | {_ms(col('recall'))} | {b['fid_preferred']:.2f} → "
            f"{_ms(col('fid_preferred'), '{:.2f}')} | {_ms(t['wall_seconds'], '{:.0f}')} | "
            + " / ".join(mark(t["meets"][k]) for k in ("rate", "liked", "rejected", "precision", "fid")) + " |")
    lines += ["", "Where the samples go: the rate after 100 / 200 / 300 labels (mean over seeds), the largest liked class's "
              "share at the end (mean; the largest seed's), the classes outside the preference that keep ≥ 3 % of "
              "the samples at the end (mean share), and the seeds meeting every bound.", "",
              "| set | rate at 100 / 200 / 300 labels | largest liked class (largest seed) | other classes ≥ 3 % "
              "| seeds meeting every bound |", "|---|---|---|---|---|"]
    for t in table:
        at = []
        for labels in (100, 200, 300):
            v = [r for c in t["curves"] for n, r in c if n == labels]
            at.append(f"{statistics.mean(v):.3f}" if len(v) == len(t["curves"]) else "n/a")
        shares = [m["class_fraction"] for m in t["final"]]
        mean = [statistics.mean(col) for col in zip(*shares)]
        top = max(t["preference"], key=lambda c: mean[c])
        worst = max(sh[top] for sh in shares)
        others = sorted((c for c in range(len(mean)) if c not in t["preference"] and mean[c] >= 0.03),
                        key=lambda c: -mean[c])
        lines.append(f"| {t['set']} | {' / '.join(at)} | {top}: {mean[top]:.2f} ({worst:.2f}) | "
                     + (", ".join(f"{c}: {mean[c]:.3f}" for c in others) or "none")
                     + f" | {sum(t['every_bound'])}/{len(t['every_bound'])} |")
    out_md = base_dir / f"{args.dataset}.md"
    out_md.write_text("\n".join(lines) + "\n")
    (base_dir / f"{args.dataset}.json").write_text(json.dumps(table, indent=1))
    _grids(grids, base_dir / f"{args.dataset}_grids.png", args.dataset)
    print("\n".join(lines))
    print(f"\nwrote {out_md}, {out_md.with_suffix('.json')} and {base_dir / (args.dataset + '_grids.png')}")
    return 0


def _grids(grids, path: Path, dataset: str) -> None:
    """Per set: the base's evaluation samples (round 0) beside the aligned model's final ones, seed 0's run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(grids), 2, figsize=(6.4, 3.3 * len(grids)), squeeze=False)
    for row, (name, pref, group, d) in zip(axes, grids):
        last = rows_of(d)[-1]["round"]
        for ax, tag, title in ((row[0], "000", "base"), (row[1], f"{last:03d}", f"after {rows_of(d)[-1]['labels_used']} labels")):
            ax.imshow(mpimg.imread(d / "rounds" / tag / "eval_grid.png"), cmap="gray")
            ax.set_title(f"{name} {pref}: {title}", fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{dataset}: the first 64 evaluation samples, base and aligned (seed {grids[0][3].name.rsplit('_s', 1)[1]})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_curves(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from papa.compare import labels_to
    sets = load_sets(args.dataset)
    target = TARGET_RATE[args.dataset]
    found = {}
    for name in args.sets or sets:
        if name not in sets:
            sys.exit(f"error: unknown set {name!r}; {PREFERENCE_SETS_FILE} has {list(sets)}")
        for tag in args.tags:
            runs = [d for d in sorted((Path(args.out) / tag / args.dataset).glob(f"{name}_s*")) if finished(d)]
            if runs:
                found.setdefault(name, {})[tag] = runs
    if not found:
        sys.exit(f"error: no finished runs of tags {args.tags} under {args.out}")
    fig, axes = plt.subplots(1, len(found), figsize=(4.6 * len(found), 3.8), squeeze=False)
    lines = [f"# {args.dataset}: variants side by side, up to {args.labels} labels", "",
             f"`scripts/preference_sets.py curves --dataset {args.dataset} --tags {' '.join(args.tags)} --labels "
             f"{args.labels}`; each run's evaluations (judged by the reject-aware evaluator, 200 fixed-seed samples "
             "between the first and last evaluation, 500 at them); mean ± std over seeds. Labels to "
             f"{target}: interpolated between evaluations, over the seeds that reach it.", "",
             "| set | variant | seeds | legible preferred rate at labels | labels to target | rejected | precision "
             "| FID | preference-model accuracy | s per round |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ax, (name, by_tag) in zip(axes[0], found.items()):
        for tag, runs in by_tag.items():
            curves, last, acc, secs = [], [], [], []
            for d in runs:
                rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
                rows = [r for r in rows if r["labels_used"] <= args.labels]
                ev = [r for r in rows if "legible_preferred_rate" in r]
                curves.append([(r["labels_used"], r["legible_preferred_rate"]) for r in ev])
                last.append(ev[-1])
                acc += [r["pref_acc"] for r in rows if "pref_acc" in r]
                secs += [r["round_seconds"] - r.get("eval_seconds", 0.0) for r in rows if r["round"] > 0]
            xs = [x for x, _ in curves[0]]
            curves = [c for c in curves if [x for x, _ in c] == xs]
            ys = [[c[i][1] for c in curves] for i in range(len(xs))]
            mean = [statistics.mean(v) for v in ys]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
            line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{tag} (n={len(curves)})",
                            color=f"C{args.tags.index(tag)}")  # one colour per variant in every panel
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
            reach = [labels_to(c, target) for c in curves]
            hit = [v for v in reach if math.isfinite(v)]
            at = ", ".join(f"{x}: {m:.3f}" for x, m in zip(xs, mean) if x > 0)
            lines.append(f"| {name} {sets[name][0]} | {tag} | {len(curves)} | {at} | "
                         f"{_ms(hit, '{:.0f}')} ({len(hit)}/{len(reach)}) | "
                         f"{_ms([r['rejected_rate'] for r in last])} | {_ms([r['precision'] for r in last])} | "
                         f"{_ms([r['fid_preferred'] for r in last], '{:.2f}')} | "
                         f"{_ms([statistics.mean(acc)]) if acc else 'n/a'} | "
                         f"{_ms([statistics.mean(secs)], '{:.1f}')} |")
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{args.dataset} {name} {sets[name][0]}", fontsize=9)
        ax.set_xlabel("labels used")
        ax.set_xlim(0, args.labels)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("legible preferred rate (evaluator)")
    fig.tight_layout()
    out = Path(args.out) / f"{args.name}_{args.dataset}"
    fig.savefig(out.with_suffix(".png"), dpi=100)
    plt.close(fig)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


def first_inside(rows: list[dict], n_liked: int, target: float, labels: int,
                 base_at: Callable[[dict], dict] | None = None) -> tuple[float, dict]:
    """The labels at the first evaluation (up to `labels`) at or above `target` with every bound holding there,
    against the run's round 0 (or, with `base_at`, against `base_at(row)`: the base judged on as many samples as that
    evaluation); nan when none. Also that evaluation's row, or the last one within `labels`."""
    ev = [r for r in rows if "legible_preferred_rate" in r and r["labels_used"] <= labels]
    for r in ev[1:]:
        base = base_at(r) if base_at is not None else ev[0]
        if within(bounds_met(r, base, n_liked, target)):
            return float(r["labels_used"]), r
    return math.nan, ev[-1]


def base_judge(d: Path) -> Callable[[dict], dict]:
    """An evaluation's row → the run's base (round 0) judged again by the run's own evaluator on as many of its kept
    images as that evaluation judged (`eval.final_num` at the first and last, `eval.num` between): the FID and
    precision of fewer samples read worse, so an evaluation of 200 is held to the base's first 200."""
    import torch

    from papa.config import load_config
    from papa.rejudge import evaluator_for
    images = d / "rounds" / "000" / "eval_images.pt"
    if not images.is_file():
        sys.exit(f"error: {images} is missing (a record keeps no images); --same-n needs the run directory itself, "
                 "under --out")
    cfg = load_config(d / "config.yaml")
    ev = evaluator_for(cfg)
    x = torch.load(images, weights_only=True)
    cache: dict[int, dict] = {}   # samples judged → the base's metrics on that many (read back by cmd_reach)

    def at(row: dict) -> dict:
        n = cfg.eval.final_num if row["round"] in (0, cfg.train.rounds) else cfg.eval.num
        if n not in cache:
            cache[n] = ev.judge_images(x[:n])[0]
        return cache[n]
    at.cache = cache
    return at


def cmd_reach(args) -> int:
    sets = load_sets(args.dataset)
    target = TARGET_RATE[args.dataset]
    missing = args.labels + 50
    names = args.sets or list(sets)
    lines = [f"# {args.dataset}: labels to a legible preferred rate of {target} inside every bound", "",
             f"`scripts/preference_sets.py reach --dataset {args.dataset} --tags {' '.join(args.tags)} --labels "
             f"{args.labels}{' --same-n' if args.same_n else ''}`. Per run: the labels at the first evaluation at or "
             f"above {target} where every bound holds (each liked class ≥ half its fair share, rejected ≤ "
             f"{REJECT_MAX}×, precision ≥ {PRECISION_MIN}×, FID ≤ {FID_MAX}× the run's round 0"
             + (", judged again on as many of its samples as the evaluation had" if args.same_n else "")
             + f"); '—' where no "
             f"evaluation within {args.labels} labels gets there, counted as {missing} in the mean. In brackets: the "
             "rate, rejected rate and FID (× the base's) and smallest liked share at that evaluation, or at the last "
             "one with the bounds it breaks.", "",
             "| set | variant | per seed: labels (rate) | seeds there | mean labels |", "|---|---|---|---|---|"]
    found, bases = False, {}
    for name in names:
        if name not in sets:
            sys.exit(f"error: unknown set {name!r}; {PREFERENCE_SETS_FILE} has {list(sets)}")
        pref = sets[name][0]
        for tag in args.tags:
            runs = sorted((d for d in (Path(args.out) / tag / args.dataset).glob(f"{name}_s*") if finished(d)),
                          key=lambda d: int(d.name.rsplit("_s", 1)[1]))
            if not runs:
                continue
            found = True
            cells, got = [], []
            for d in runs:
                rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
                base_at = base_judge(d) if args.same_n else None
                n, row = first_inside(rows, len(pref), target, args.labels, base_at)
                seed = d.name.rsplit("_s", 1)[1]
                base = base_at(row) if base_at is not None else \
                    next(r for r in rows if "legible_preferred_rate" in r)
                broken = [k for k, v in bounds_met(row, base, len(pref), target).items() if v is False]
                rej = (f"{row['rejected_rate'] / base['rejected_rate']:.2f}×" if base["rejected_rate"] > 0 else
                       f"{100 * row['rejected_rate']:.1f} % (base none)")
                quality = (f"rejected {rej}, FID "
                           f"{row['fid_preferred'] / base['fid_preferred']:.2f}×, smallest liked "
                           f"{row['min_liked_share']:.3f}")
                cells.append(f"s{seed}: {n:.0f} ({row['legible_preferred_rate']:.3f}; {quality})" if math.isfinite(n)
                             else f"s{seed}: — ({row['legible_preferred_rate']:.3f}; {quality}; breaks "
                                  f"{', '.join(broken)})")
                if base_at is not None:
                    bases.setdefault(name, {k: v["fid_preferred"] for k, v in sorted(base_at.cache.items())})
                got.append(n)
            there = [n for n in got if math.isfinite(n)]
            mean = statistics.mean(n if math.isfinite(n) else missing for n in got)
            lines.append(f"| {name} {pref} | {tag} | {'; '.join(cells)} | {len(there)}/{len(got)} | {mean:.0f} |")
    if not found:
        sys.exit(f"error: no finished runs of tags {args.tags} under {args.out}")
    if bases:
        lines += ["", "The base's FID on its first N kept samples (the first run of each set): " + "; ".join(
            f"{name}: " + ", ".join(f"{v:.2f} on {n}" for n, v in fids.items()) for name, fids in bases.items())]
    out = Path(args.out) / f"{args.name}_{args.dataset}.md"
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(f"\nwrote {out}")
    return 0


def cmd_asked(args) -> int:
    """What each run asked the user about: the evaluator's class of every labelled image (rounds/NNN/images.pt with its
    labels.json), counted among the likes and among the dislikes, over the first and the second half of the rounds."""
    import torch

    from papa.config import load_config
    from papa.metrics import classify
    from papa.models import load_classifier
    from papa.models.classifier import NUM_CLASSES, REJECT_CLASS
    n_out = NUM_CLASSES + 1  # the classes and "no member of any class"
    base = Path(args.out) / args.tag / args.dataset
    runs = sorted(d for d in base.glob("*_s*") if (d / "rounds").is_dir())
    if not runs:
        print(f"error: no run with rounds/ under {base}; run `scripts/preference_sets.py run` with this --tag first",
              file=sys.stderr)
        return 2
    lines = ["| run | rounds | likes | likes by class (share) | dislikes by class (share) |", "|---|---|---|---|---|"]
    nets: dict[str, torch.nn.Module] = {}
    for d in runs:
        cfg = load_config(d / "config.yaml")
        path = str(cfg.checkpoints.evaluator)
        if path not in nets:
            nets[path] = load_classifier("evaluator", path, dataset=args.dataset)
        rounds = sorted(r for r in (d / "rounds").iterdir() if (r / "labels.json").is_file() and r.name != "000")
        halves = (("first half", rounds[:len(rounds) // 2]), ("second half", rounds[len(rounds) // 2:]))
        for part, sel in (h for h in halves if h[1]):
            counts = {1: torch.zeros(n_out), -1: torch.zeros(n_out)}
            for r in sel:
                labels = json.loads((r / "labels.json").read_text())
                y = torch.tensor([labels[k] for k in sorted(labels)])
                probs, _ = classify(nets[path], torch.load(r / "images.pt", weights_only=True))
                pred = probs.argmax(1)
                for v in (1, -1):
                    counts[v] += torch.bincount(pred[y == v], minlength=n_out).float()
            cells = []
            for v in (1, -1):
                n = counts[v].sum().clamp_min(1)
                top = [(i, c / n) for i, c in enumerate(counts[v].tolist()) if c / n >= 0.05]
                top.sort(key=lambda t: -t[1])
                cells.append(", ".join(f"{'reject' if i == REJECT_CLASS else i}: {f:.2f}" for i, f in top))
            lines.append(f"| {d.name} | {part} ({sel[0].name}–{sel[-1].name}) | {int(counts[1].sum())} | {cells[0]} | "
                         f"{cells[1]} |")
    print("\n".join(lines))
    print("\nclasses under 5 % of the likes or dislikes left out; the evaluator's decision, 'reject': not a member")
    return 0


CALIBRATION_BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def asked_answers(d: Path) -> list[tuple[float, int]]:
    """(p(like) the preference model gave an image before it was asked, the answer: 1 like, 0 dislike) for every
    image a selector chose and the person answered (skips left out), from rounds/NNN/pool.json and labels.json."""
    out = []
    for pool in sorted(d.glob("rounds/*/pool.json")):
        p = json.loads(pool.read_text()).get("p_like")
        labels = pool.parent / "labels.json"
        if p is None or not labels.is_file():
            continue                         # no model yet (the first rounds), or a round without answers kept
        answers = json.loads(labels.read_text())
        y = [answers[k] for k in sorted(answers)]
        if len(y) != len(p):
            raise ValueError(f"{pool}: {len(p)} predictions for {len(y)} answers")
        out += [(float(pi), int(yi > 0)) for pi, yi in zip(p, y) if yi != 0]
    return out


def calibration_rows(pairs: list[tuple[float, int]]) -> dict:
    """Reliability over `CALIBRATION_BINS`: per bin the images, mean p(like) and the share liked; the expected
    calibration error (ECE, the bins' |mean p − share liked| weighted by their images), accuracy of p > 0.5, Brier."""
    n = len(pairs)
    bins = []
    for lo, hi in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]):
        b = [(p, y) for p, y in pairs if lo <= p < hi or (hi == 1.0 and p == 1.0)]
        if b:
            bins.append({"lo": lo, "hi": hi, "n": len(b), "p": statistics.mean(p for p, _ in b),
                         "liked": statistics.mean(y for _, y in b)})
    return {"n": n, "bins": bins,
            "ece": sum(b["n"] / n * abs(b["p"] - b["liked"]) for b in bins) if n else math.nan,
            "acc": statistics.mean(int((p > 0.5) == bool(y)) for p, y in pairs) if n else math.nan,
            "brier": statistics.mean((p - y) ** 2 for p, y in pairs) if n else math.nan}


def cmd_calibration(args) -> int:
    """How well the selectors' preference model foresaw the answers it had not yet seen, per tag over its runs: a
    reliability table (predicted p(like) against the share the person liked, per bin), ECE, accuracy and Brier."""
    lines = ["| variant | runs | answers | " + " | ".join(f"p in [{lo:.1f}, {hi:.1f})" for lo, hi in
                                                    zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]))
            + " | ECE | accuracy | Brier |", "|---|---|---|" + "---|" * (len(CALIBRATION_BINS) - 1) + "---|---|---|"]
    for tag in args.tags:
        runs = sorted(d for d in (Path(args.out) / tag / args.dataset).glob("*_s*")
                      if not args.sets or d.name.rsplit("_s", 1)[0] in args.sets)
        pairs = [pa for d in runs for pa in asked_answers(d)]
        if not pairs:
            print(f"error: no run under {Path(args.out) / tag / args.dataset} kept a selector's predictions "
                  "(rounds/NNN/pool.json with p_like, and labels.json); run it with select.selector set",
                  file=sys.stderr)
            return 2
        c = calibration_rows(pairs)
        cells = []
        for lo, hi in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:]):
            b = next((b for b in c["bins"] if b["lo"] == lo), None)
            cells.append(f"{b['liked']:.2f} liked at {b['p']:.2f} (n {b['n']})" if b else "—")
        lines.append(f"| {tag} | {len(runs)} | {c['n']} | " + " | ".join(cells)
                     + f" | {c['ece']:.3f} | {c['acc']:.3f} | {c['brier']:.3f} |")
    text = "\n".join(lines) + ("\n\nEach cell: the share of the asked images the person liked, at the preference "
                               "model's mean p(like) for them, among the images it gave a p(like) in that bin before "
                               "they were asked (skips left out). ECE: the bins' |mean p − share liked|, weighted by "
                               "their images.\n")
    path = Path(args.out) / f"{args.name}_{args.dataset}.md"
    atomic_write_bytes(path, text.encode())
    print(text + f"\nwritten: {path}")
    return 0


def cmd_user(args) -> int:
    """How the run's simulated user answers one evaluation's images (`--round`, default 0: the base model's samples),
    per class the evaluator puts them in: the share the user is sure is that class (so would like it when the class
    is preferred), the share it skips as unsure, the rest (another class or none: disliked), and the share it
    likes under the run's own preference. Round 0 shows which classes the user is surest of; the last round whether
    the classes the evaluator counts against the preference are ones the user dislikes (so training could remove
    them) or likes (so the two judges disagree and no training could)."""
    import torch

    from papa.config import load_config
    from papa.feedback import OracleFeedback
    from papa.metrics import classify
    from papa.models import load_classifier
    from papa.models.classifier import NUM_CLASSES, REJECT_CLASS
    d = Path(args.run)
    images = d / "rounds" / f"{args.round:03d}" / "eval_images.pt"
    if not images.is_file() or not (d / "config.yaml").is_file():
        print(f"error: {d} has no config.yaml and rounds/{args.round:03d}/eval_images.pt; give a run directory made by "
              "papa.train and a round it evaluated (runs keep their first and last evaluations' images)",
              file=sys.stderr)
        return 2
    cfg = load_config(d / "config.yaml")
    ds, fb = cfg.data.dataset, cfg.feedback
    x = torch.load(images, weights_only=True)
    pred = classify(load_classifier("evaluator", cfg.checkpoints.evaluator, dataset=ds), x)[0].argmax(1)
    user = OracleFeedback(load_classifier("oracle", cfg.checkpoints.oracle, dataset=ds), list(range(NUM_CLASSES)),
                          skip_below=fb.skip_below, reject=fb.reject)
    sure = ~user.unsure(x)  # the user's own skip rule
    with torch.no_grad():
        arg = user.probs(x).argmax(1)
    liked = sure & torch.isin(arg, torch.tensor(list(fb.preference)))
    lines = [f"{d}, round {args.round} ({len(x)} samples; preference {list(fb.preference)}; skip_below "
             f"{fb.skip_below}, reject {fb.reject})", "",
             "| evaluator's class | samples | user sure it is that class | skipped | another class or none "
             "| liked under the preference |", "|---|---|---|---|---|---|"]
    for c in range(NUM_CLASSES + 1):
        m = pred == c
        if m.any():
            agree, skip = float(((arg[m] == c) & sure[m]).float().mean()), float((~sure[m]).float().mean())
            star = "*" if c in fb.preference else ""
            lines.append(f"| {'none of them (reject)' if c == REJECT_CLASS else f'{c}{star}'} | {int(m.sum())} | "
                         f"{agree:.2f} | {skip:.2f} | {1 - agree - skip:.2f} | {float(liked[m].float().mean()):.2f} |")
    lines += ["", "(* a preferred class)"]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/preference_sets.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "curves", "reach", "asked", "user", "calibration"):
        p = sub.add_parser(name)
        if name == "user":
            p.add_argument("run", help="a run directory (its config and an evaluation's images)")
            p.add_argument("--round", type=int, default=0,
                           help="the evaluation to read (default 0, the base's samples; runs keep the last one too)")
            continue
        p.add_argument("--dataset", default="mnist", choices=("mnist", "fashion_mnist"))
        p.add_argument("--out", default="runs/preference_sets")
        p.add_argument("--tag", default="default", help="a name for this variant of the config")
        if name == "run":
            p.add_argument("--sets", nargs="*", default=None, help="set names (default: all of the dataset's)")
            p.add_argument("--seeds", nargs="*", type=int, default=[0])
            p.add_argument("--threads", type=int, default=2)
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("--records", default="docs/results/preference_sets",
                           help="keep each finished run's small files here (skip a run recorded there); '' : none")
        if name == "calibration":
            p.add_argument("--tags", nargs="+", required=True, help="the variants (selectors) to set side by side")
            p.add_argument("--name", default="calibration", help="the output file's name")
            p.add_argument("--sets", nargs="*", default=None, help="set names (default: every run of the tag)")
        if name in ("curves", "reach"):
            p.add_argument("--tags", nargs="+", required=True, help="the variants to set side by side")
            p.add_argument("--labels", type=int, default=150, help="the label budget the curves stop at")
            p.add_argument("--name", default="selectors" if name == "curves" else "reach", help="the output files' name")
            p.add_argument("--sets", nargs="*", default=None, help="set names (default: all of the dataset's)")
        if name == "reach":
            p.add_argument("--same-n", action="store_true", help="hold an evaluation of fewer samples than round 0's "
                           "to the base judged on as many (its first kept images; needs the run directories)")
    args = ap.parse_args(argv)
    return {"run": cmd_run, "report": cmd_report, "curves": cmd_curves, "reach": cmd_reach, "asked": cmd_asked,
            "user": cmd_user, "calibration": cmd_calibration}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
