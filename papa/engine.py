"""The round engine, shared by every method: sample → feedback → update → evaluate → record → checkpoint.

One round: the current model draws `samples_per_round` images (sharded over ranks, per-sample seeds so the result does
not depend on the number of ranks; ePAPA's base model below k), the feedback source labels them, the method's work
list of (sample, timestep) items is split over ranks and pushed through the UNet in chunks whose gradients accumulate
(peak memory does not grow with T), gradients are all-reduced once per optimiser step, and the evaluator judges a
fixed-seed batch. Every round ends with an atomic checkpoint holding everything `--resume` needs; the two newest are
kept, and a corrupt newest one falls back to the previous.

Everything random in a round derives from (train.seed, round), so a resumed run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from papa import checkpoint, dist
from papa.algos import get_method
from papa.config import Config, config_hash, dump_yaml, to_dict
from papa.data import CLASS_NAMES, load_dataset
from papa.evaluate import class_stats, classify, frechet_distance
from papa.feedback import build_feedback
from papa.models import load_classifier, load_unet
from papa.pretrain import to_model_range
from papa.sampling import Trajectories, sample, sample_trajectories
from papa.schedule import NoiseSchedule


def peak_memory_mb(device: torch.device) -> dict:
    """Peak memory so far: the process's peak RSS (CPU; whole process, so runs sharing a process share it) and, on CUDA,
    the peak of torch's allocator."""
    import resource
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


class NonFiniteLoss(RuntimeError):
    """The loss or gradients became NaN/inf: the round is abandoned and the last good checkpoint kept."""


@dataclass
class RunState:
    round: int = 0                                   # rounds completed
    history: list = field(default_factory=list)      # per round: the method's training tensors (replay, keeps_history)
    metrics: list = field(default_factory=list)      # rows written to metrics.jsonl
    elapsed: float = 0.0                             # seconds of training so far (across resumes)


def default_sample_path(cfg: Config) -> str:
    t = cfg.train
    return cfg.train.sample_path or f"{t.algo}{f'_k{t.epapa_k}' if t.epapa_k else ''}_seed{t.seed}"


def round_lr(lr: float, decay: str, r: int, rounds: int) -> float:
    """The learning rate of round r (0-based) of `rounds`: constant, linear to lr/R in the last round, or cosine."""
    if decay == "linear":
        return lr * (rounds - r) / rounds
    if decay == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * r / rounds))
    return lr


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.task_name / default_sample_path(cfg)


class Engine:
    def __init__(self, cfg: Config, run_dir: Path, rank: int = 0, world: int = 1, device=torch.device("cpu")):
        self.cfg, self.run_dir, self.rank, self.world, self.device = cfg, Path(run_dir), rank, world, device
        self.main = rank == 0
        ck, t = cfg.checkpoints, cfg.train
        # load everything first: a bad path fails before anything is written
        ds = cfg.data.dataset  # every checkpoint must say it was made for this dataset, where it says anything
        self.model = load_unet(cfg.model, ck.base, dataset=ds).to(device)
        self.base = copy.deepcopy(self.model).requires_grad_(False)
        self.evaluator = load_classifier("evaluator", ck.evaluator, ds).to(device)
        oracle = load_classifier("oracle", ck.oracle, ds).to(device) if cfg.feedback.source == "oracle" else None
        self.feedback = build_feedback(cfg, oracle)
        self.sched = NoiseSchedule.from_config(cfg.diffusion)
        self.method = get_method(t.algo)(self)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        # the evaluated model: the policy itself, or an exponential moving average of its weights (train.ema_decay)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if t.ema_decay > 0 else None
        xte, yte = load_dataset(cfg.data.dataset, "test", root=cfg.data.root or None)
        pref = torch.tensor(cfg.feedback.preference)
        keep = torch.isin(torch.from_numpy(yte).long(), pref)
        _, self.test_feats = classify(self.evaluator, to_model_range(torch.from_numpy(xte[keep.numpy()])).to(device))
        # a fixed probe for the KL-to-base diagnostic: real test images noised at fixed steps of the sampling chain
        g = torch.Generator().manual_seed(cfg.eval.seed)
        ts = torch.tensor(self.sched.sampling_timesteps(cfg.diffusion.sample_steps))
        j = torch.randint(0, len(ts) - 1, (64,), generator=g)  # never the last step (σ = 0)
        x0 = to_model_range(torch.from_numpy(xte[torch.randperm(len(xte), generator=g)[:64].numpy()]))
        pt, ptp = ts[j], ts[j + 1]
        self.probe = (self.sched.add_noise(x0, torch.randn(x0.shape, generator=g), pt).to(device), pt.to(device),
                      self.sched.fused_coefficients(pt, ptp, cfg.diffusion.sampler, cfg.diffusion.eta).to(device))
        self.state = RunState()
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ records
    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg)
            with open(self.run_dir / "log.txt", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def _write_metrics(self) -> None:
        rows = self.state.metrics
        checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        keys = sorted({k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        checkpoint.atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        s = self.state
        path = self.ckpt_dir / f"round_{s.round:03d}.pt"
        checkpoint.atomic_save({
            "model": self.model.state_dict(), "opt": self.opt.state_dict(), "round": s.round,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "history": s.history, "metrics": s.metrics, "elapsed": s.elapsed, "dataset": self.cfg.data.dataset,
            "config_hash": config_hash(self.cfg), "torch_rng": torch.get_rng_state()}, path)
        # keep the newest two, by round number (a text sort puts round_1000 before round_999): latest and last good
        earlier = [(n, p) for n, p in checkpoint.round_files(self.ckpt_dir) if n < s.round]
        for _, old in earlier[:-1]:
            old.unlink(missing_ok=True)
        return path

    def _load_round(self, path: Path, n: int, force: bool) -> dict:
        """A round checkpoint checked for structure, provenance and fit before anything is loaded from it."""
        st = checkpoint.check_round(checkpoint.load(path), path, expect_round=n)
        if st["config_hash"] != config_hash(self.cfg) and not force:
            raise checkpoint.CheckpointError(
                f"{path.name} was written under another config than {self.run_dir / 'config.yaml'} now holds "
                "(edited by hand?); restore that file, or pass --force to resume under the new one")
        if st.get("dataset", self.cfg.data.dataset) != self.cfg.data.dataset:
            raise checkpoint.CheckpointError(f"{path.name} is a {st['dataset']} run, the config says "
                                             f"data.dataset: {self.cfg.data.dataset}")
        if (self.ema is None) != ("ema" not in st):
            raise checkpoint.CheckpointError(f"{path.name} {'lacks' if self.ema is not None else 'has'} EMA weights "
                                             f"but train.ema_decay is {self.cfg.train.ema_decay}")
        groups = st["opt"].get("param_groups")
        if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
                [len(g["params"]) for g in self.opt.param_groups]:
            raise checkpoint.CheckpointError(f"{path.name}: its optimiser state does not fit this model")
        return st

    def try_resume(self, force: bool = False) -> bool:
        """Load the newest usable checkpoint; an unusable one (corrupt, truncated, wrong structure or provenance,
        non-finite weights) is reported and the previous one tried. When checkpoints exist but none is usable, or the
        records say rounds were done that no checkpoint holds, refuse (CheckpointError) rather than start again over
        them: nothing is written or deleted before that check."""
        files = checkpoint.round_files(self.ckpt_dir)
        problems = []
        for n, path in reversed(files):
            try:
                st = self._load_round(path, n, force)
                self.model.load_state_dict(st["model"])
                self.opt.load_state_dict(st["opt"])
                if self.ema is not None:
                    self.ema.load_state_dict(st["ema"])
            except (checkpoint.CheckpointError, KeyError, RuntimeError, ValueError, TypeError) as e:
                problems.append(f"{path.name}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
                self.log(f"warning: {path.name} is unusable ({problems[-1]}); trying the previous checkpoint")
                continue
            self.state = RunState(st["round"], st["history"], st["metrics"], st["elapsed"])
            torch.set_rng_state(st["torch_rng"])
            self.log(f"resumed from {path} (round {self.state.round} done)")
            return True
        if files:
            raise checkpoint.CheckpointError(
                f"--resume {self.run_dir}: no usable checkpoint ({'; '.join(problems)}); nothing was changed. Move "
                "the bad files out of checkpoints/ to resume from an earlier one, or start afresh with --overwrite")
        done = self._recorded_rounds()
        if done > 0:
            raise checkpoint.CheckpointError(
                f"--resume {self.run_dir}: metrics.jsonl records {done} round(s) but checkpoints/ holds none; nothing "
                "was changed. Restore the checkpoints, or start afresh with --overwrite")
        self.log("no checkpoint yet (the run stopped in its first round): starting at round 1")
        return False

    def _recorded_rounds(self) -> int:
        f = self.run_dir / "metrics.jsonl"
        try:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
            return max((int(r.get("round", 0)) for r in rows if isinstance(r, dict)), default=0)
        except (ValueError, OSError):
            return 1  # unreadable records of a run that did something: do not start over them

    # ------------------------------------------------------------------ phases
    def sample_images(self, n: int, seed: int, epapa: bool = True, net: torch.nn.Module | None = None) -> torch.Tensor:
        """n images from the current model, or `net` (ePAPA's base model below k when `epapa`), sharded over ranks, on
        every rank."""
        d, idx = self.cfg.diffusion, dist.shard(n, self.rank, self.world)
        k = self.cfg.train.epapa_k if epapa else 0
        net = self.model if net is None else net
        local = sample(net, self.sched, len(idx), steps=d.sample_steps, sampler=d.sampler, eta=d.eta,
                       seed=seed, first_index=idx.start, batch_size=self.cfg.eval.batch_size,
                       base_model=self.base if k else None, epapa_k=k, device=self.device,
                       progress=self.main and n > 50, cuda_graph=self.device.type == "cuda")
        return dist.gather_cat(local, self.world)

    def sample_trajectories(self, n: int, seed: int, paired: bool = False) -> Trajectories:
        """n recorded trajectories with the training sampler (train.traj_*), sharded over ranks (whole pairs)."""
        t = self.cfg.train
        unit = 2 if paired else 1
        idx = dist.shard(n // unit, self.rank, self.world)
        local = sample_trajectories(self.model, self.sched, len(idx) * unit, steps=t.traj_steps,
                                    sampler=t.traj_sampler, eta=t.traj_eta, seed=seed, first_index=idx.start * unit,
                                    paired=paired, device=self.device)
        for k in ("x", "x0_hat", "log_prob"):
            local[k] = dist.gather_cat(local[k], self.world)
        return local

    def ask(self, query, r: int, images: torch.Tensor) -> torch.Tensor:
        """Rank 0 saves the round's `images` under rounds/NNN/ (so a person, or a labels file, can refer to them),
        then asks the feedback source (`query()`); every rank gets the answer, or the source's error."""
        def on_main() -> torch.Tensor:
            self._save_images(r, images)
            return query().cpu()
        return dist.on_main(on_main, self.world, self.rank)

    @torch.no_grad()
    def kl_to_base(self) -> float:
        """Mean per-step KL(p_θ ‖ p_base) of the sampling chain on a fixed probe, nats per pixel (pixel mean)."""
        x, t, coef = self.probe
        d = self.evaluated(x, t) - self.base(x, t)
        return float((coef[:, 1] ** 2 * d.square().flatten(1).mean(1) / (2 * coef[:, 2] ** 2)).mean())

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model that evaluations judge: the EMA of the policy when train.ema_decay > 0, else the policy."""
        return self.ema if self.ema is not None else self.model

    def evaluate(self, num: int) -> tuple[dict, torch.Tensor]:
        """Evaluator metrics on `num` fixed-seed samples, and the samples."""
        self.model.eval()
        imgs = self.sample_images(num, self.cfg.eval.seed, net=self.evaluated)
        probs, feats = classify(self.evaluator, imgs.to(self.device))
        pref = self.cfg.feedback.preference
        out = class_stats(probs.cpu(), pref)
        sel = torch.isin(probs.argmax(1).cpu(), torch.tensor(pref))
        out["fid_preferred"] = frechet_distance(feats[sel].cpu(), self.test_feats.cpu()) if sel.sum() >= 2 else math.nan
        out["kl_to_base"] = self.kl_to_base()
        out["eval_num"] = num
        return out, imgs

    def training_set(self, data: dict, r: int) -> dict:
        """Round r's training units: its own feedback; with replay, all earlier feedback too, or (replay_size N > 0)
        N units drawn without replacement from it, seeded by (seed, round) so a resumed run draws the same."""
        t, h, m = self.cfg.train, self.state.history, self.method
        if not t.replay or len(h) == 1:
            return data
        if t.replay_size == 0:
            return m.merge(h)
        earlier = m.merge(h[:-1])
        n = m.num_units(earlier)
        gen = torch.Generator().manual_seed(t.seed * 104_729 + r)
        pick = torch.randperm(n, generator=gen)[:t.replay_size]
        return m.merge([data, m.select(earlier, pick)])

    def update(self, data: dict, r: int) -> dict:
        """The method's update: units shuffled into optimiser steps; each step's work list sharded over ranks and
        pushed through the UNet in chunks whose gradients accumulate; one all-reduce per optimiser step."""
        t, m = self.cfg.train, self.method
        gen = torch.Generator().manual_seed(t.seed * 7919 + r)
        for g in self.opt.param_groups:  # a function of the round only, so a resumed run sets the same value
            g["lr"] = round_lr(t.lr, t.lr_decay, r, t.rounds)
        self.model.train()
        losses, n_items, stats = [], 0, {}
        data = m.prepare(data, self.state.history)
        n = m.num_units(data)
        batches = [b for _ in range(t.epochs_per_round) for b in torch.randperm(n, generator=gen).split(t.batch_size)]
        bar = tqdm(batches, desc=f"round {r + 1} update", disable=not self.main, leave=False, dynamic_ncols=True)
        for units in bar:
            ctx, items = m.step_items(data, units, gen)
            if len(items) == 0:
                continue
            mine = dist.shard(len(items), self.rank, self.world)
            self.opt.zero_grad(set_to_none=False)
            total, st = 0.0, {}
            for c in range(mine.start, mine.stop, t.timestep_chunk):
                chunk = items.slice(slice(c, min(c + t.timestep_chunk, mine.stop))).to(self.device)
                loss, cs = m.loss(ctx, chunk)
                loss.backward()
                total += loss.item()
                for k, v in cs.items():
                    st[k] = st.get(k, 0.0) + float(v)
            ref_scale = t.loss_scale == "reference"
            dist.all_reduce_grads(self.model, self.world, mean=ref_scale)
            total = dist.all_reduce_sum(total, self.world) / (self.world if ref_scale else 1)
            for k in m.stat_keys:  # the same keys on every rank: one collective each
                stats[k] = stats.get(k, 0.0) + dist.all_reduce_sum(st.get(k, 0.0), self.world)
            grads_ok = all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None)
            if not math.isfinite(total) or not grads_ok:
                raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(total) else 'gradients'} "
                                    f"(loss {total}) in round {r + 1}")
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.opt.step()
            if self.ema is not None:  # identical on every rank: the all-reduced gradients gave identical weights
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(pm, 1.0 - t.ema_decay)
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):  # e.g. a huge lr: finite grads,
                raise NonFiniteLoss(f"non-finite weights after an optimiser step in round {r + 1}")  # inf weights
            losses.append(total)
            n_items += len(items)
            bar.set_postfix(loss=f"{total:.4f}")
        bar.close()
        return {"loss": sum(losses) / max(1, len(losses)), "optimizer_steps": len(losses), "unet_items": n_items,
                **m.summarize(stats)}

    # ------------------------------------------------------------------ the loop
    def _record_eval(self, row: dict, num: int, tag: str) -> None:
        t0 = time.time()
        ev, imgs = self.evaluate(num)
        row.update(ev)
        if self.main:
            from papa.sample import save_grid
            save_grid(imgs[:64], self.run_dir / "rounds" / tag / "eval_grid.png", nrow=8)
        row["eval_seconds"] = round(time.time() - t0, 2)

    def _base_eval_cache(self) -> Path:
        """Where the base model's round-0 evaluation is kept for reuse: it depends only on the base checkpoint, the
        evaluator, the data, the preference and the evaluation settings, so every method and seed shares it."""
        cfg = self.cfg
        key = self._base_eval_key()
        return Path(cfg.train.output_dir) / cfg.task_name / ".base_eval" / f"{config_hash(key)}.json"

    def _base_eval_key(self) -> dict:
        cfg = self.cfg  # the files by content: a replaced checkpoint with the same size and time is a new one
        return {"files": [checkpoint.sha256_file(p) for p in (cfg.checkpoints.base, cfg.checkpoints.evaluator)],
                "model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion), "data": to_dict(cfg.data),
                "preference": cfg.feedback.preference, "num": cfg.eval.final_num, "seed": cfg.eval.seed}

    def _read_base_eval(self, cache: Path) -> dict | None:
        """The cached round-0 metrics, or None (recompute) when the file is unreadable, truncated, for other inputs,
        or its values do not match the digest written with them (edited by hand)."""
        try:
            rec = json.loads(cache.read_text())
            ev, key = rec["metrics"], rec["key"]
            ok = (key == self._base_eval_key() and rec["digest"] == config_hash({"key": key, "metrics": ev})
                  and 0.0 <= ev["preferred_rate"] <= 1.0 and ev["eval_num"] == self.cfg.eval.final_num)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.log(f"warning: {cache} is not a valid base-model evaluation; evaluating the base model again")
            return None
        return ev

    def _round0(self) -> dict:
        row = {"round": 0, "labels_used": 0, "elapsed": 0.0}
        cache = self._base_eval_cache()
        # every rank reads the same file and reaches the same verdict, so they evaluate (collectively) or not together
        ev = self._read_base_eval(cache) if cache.is_file() else None
        if ev is not None:
            row.update(ev)
            row["eval_cached"] = True
            if self.main and cache.with_suffix(".png").is_file():
                dst = self.run_dir / "rounds" / "000" / "eval_grid.png"
                checkpoint.atomic_write_bytes(dst, cache.with_suffix(".png").read_bytes())
            return row
        self._record_eval(row, self.cfg.eval.final_num, "000")
        if self.main:
            ev = {k: v for k, v in row.items() if k not in ("round", "labels_used", "elapsed", "eval_seconds")}
            key = self._base_eval_key()
            checkpoint.atomic_write_bytes(cache.with_suffix(".png"),
                                          (self.run_dir / "rounds" / "000" / "eval_grid.png").read_bytes())
            checkpoint.atomic_write_text(cache, json.dumps({"key": key, "metrics": ev,
                                                            "digest": config_hash({"key": key, "metrics": ev})}))
        return row

    # files a run writes at the top of its directory; --overwrite removes these (and rounds/, checkpoints/) only
    RUN_FILES = ("config.yaml", "log.txt", "metrics.jsonl", "metrics.csv", "summary.md", "curves.png")

    def _clear_run(self) -> None:
        """--overwrite: the old run's files go, after the new run has been validated and holds the lock."""
        import shutil
        for name in self.RUN_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
        for sub in ("rounds", "checkpoints"):
            shutil.rmtree(self.run_dir / sub, ignore_errors=True)

    def _open(self, resume: bool, force: bool, overwrite: bool) -> None:
        """Take the run directory: lock it (rank 0; every rank learns the outcome), tidy what a killed writer left,
        clear it for --overwrite, load the checkpoint for --resume. Nothing is written before the lock is held, and
        a refused resume writes nothing but the lock file."""
        def take() -> None:
            self.lock = checkpoint.RunLock(self.run_dir).acquire()
            for d in (self.run_dir, self.ckpt_dir, *sorted((self.run_dir / "rounds").glob("*"))):
                checkpoint.remove_stale_temps(d)
            if overwrite:
                self._clear_run()
        dist.on_main(take, self.world, self.rank)
        dist.barrier(self.world)
        if resume:
            self.try_resume(force)

    def close(self) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def run(self, resume: bool = False, force: bool = False, overwrite: bool = False) -> RunState:
        try:
            return self._run(resume, force, overwrite)
        finally:
            self.close()

    def _run(self, resume: bool, force: bool, overwrite: bool) -> RunState:
        cfg, t = self.cfg, self.cfg.train
        self._open(resume, force, overwrite)
        if self.main:
            checkpoint.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        dist.barrier(self.world)
        s = self.state
        if not s.metrics:  # round 0: the base model, before any feedback
            row = self._round0()
            s.metrics.append(row)
            self._line(row)
        for r in range(s.round, t.rounds):
            t0 = time.time()
            # 1-2. the method samples from the current model and asks the feedback source (rank 0; all ranks agree)
            self.model.eval()
            data = self.method.collect(r)
            if self.main:
                self._save_round(r + 1, data)
            s.history.append(data.tensors if t.replay or self.method.keeps_history else {})
            # 3. update on this round's feedback, or on it plus earlier rounds' (replay)
            upd = self.update(self.training_set(data.tensors, r), r)
            # 4. evaluate (first and last on final_num samples), 5. record, 6. checkpoint
            used = (s.metrics[-1]["labels_used"] if s.metrics else 0) + data.queries
            row = {"round": r + 1, "labels_used": used, **data.stats, **upd}
            last = r + 1 == t.rounds
            if last or (r + 1) % cfg.eval.every == 0:
                self._record_eval(row, cfg.eval.final_num if last else cfg.eval.num, f"{r + 1:03d}")
            s.elapsed += time.time() - t0
            row["round_seconds"] = round(time.time() - t0, 2)
            row["elapsed"] = round(s.elapsed, 1)
            row.update(peak_memory_mb(self.device))
            s.metrics.append(row)
            s.round = r + 1
            if self.main:
                self._write_metrics()
                self.save()
            dist.barrier(self.world)
            self._line(row)
        if self.main:
            self._write_metrics()
            self.finish()
        return s

    def _line(self, row: dict) -> None:
        parts = [f"round {row['round']:3d}", f"labels {row['labels_used']:4d}"]
        if "preferred_rate" in row:
            parts += [f"rate {row['preferred_rate']:.3f}", f"diversity {row['diversity']:.3f}",
                      f"FID {row['fid_preferred']:.2f}"]
        if "loss" in row:
            parts += [f"loss {row['loss']:+.4f}"]
        if "round_seconds" in row:
            parts += [f"{row['round_seconds']:.1f}s"]
        self.log(" | ".join(parts))

    def _save_images(self, r: int, images: torch.Tensor) -> None:
        """rounds/NNN/grid.png and images.pt: what the user is asked about, written before the question."""
        from papa.sample import save_grid
        d = self.run_dir / "rounds" / f"{r:03d}"
        save_grid(images, d / "grid.png", nrow=min(10, len(images)))
        buf = io.BytesIO()
        torch.save(images.cpu(), buf)
        checkpoint.atomic_write_bytes(d / "images.pt", buf.getvalue())

    def _save_round(self, r: int, data) -> None:
        """rounds/NNN/labels.json: the answers (the images were saved before asking)."""
        d = self.run_dir / "rounds" / f"{r:03d}"
        if not (d / "images.pt").is_file():  # a method that asked no one still shows what it trained on
            self._save_images(r, data.images)
        checkpoint.atomic_write_text(d / "labels.json", json.dumps(data.labels, indent=1))

    def finish(self) -> None:
        """curves.png and summary.md from metrics."""
        rows = [m for m in self.state.metrics if "preferred_rate" in m]
        if rows:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
            lab = [m["labels_used"] for m in rows]
            for ax, key, title in zip(axes, ("preferred_rate", "diversity", "fid_preferred"),
                                      ("preferred-class rate (evaluator)", "diversity in preferred set",
                                       "FID, preferred classes (evaluator features)")):
                ax.plot(lab, [m[key] for m in rows], marker="o")
                ax.set_xlabel("labels used")
                ax.set_title(title, fontsize=10)
                ax.grid(alpha=0.3)
            axes[0].set_ylim(0, 1.02)
            fig.suptitle(f"{self.cfg.task_name} · {default_sample_path(self.cfg)} · preference "
                         f"{self.cfg.feedback.preference}", fontsize=10)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            plt.close(fig)
            checkpoint.atomic_write_bytes(self.run_dir / "curves.png", buf.getvalue())
        first, last = (rows[0], rows[-1]) if rows else ({}, {})
        names = CLASS_NAMES[self.cfg.data.dataset]
        fmt = lambda m, k: f"{m[k]:.3f}" if k in m else "n/a"
        lines = [f"# {self.cfg.task_name}: {default_sample_path(self.cfg)}", "",
                 f"Preference: {[names[c] for c in self.cfg.feedback.preference]}; method {self.cfg.train.algo}"
                 f" (epapa_k {self.cfg.train.epapa_k}); {self.state.round} rounds × "
                 f"{self.cfg.train.samples_per_round} samples; {self.state.elapsed:.0f} s of training.", "",
                 "| | labels | preferred rate | diversity | FID (preferred) | confidence |", "|---|---|---|---|---|---|"]
        for tag, m in (("base", first), ("final", last)):
            if m:
                lines.append(f"| {tag} | {m['labels_used']} | {fmt(m, 'preferred_rate')} | {fmt(m, 'diversity')} | "
                             f"{fmt(m, 'fid_preferred')} | {fmt(m, 'mean_confidence')} |")
        lines += ["", "Judged by the evaluator classifier (never the oracle that gave feedback) on "
                  f"{self.cfg.eval.final_num} fixed-seed samples. Curves: `curves.png`; per-round images and labels: "
                  "`rounds/`; every metric: `metrics.jsonl` / `metrics.csv`; config: `config.yaml`."]
        checkpoint.atomic_write_text(self.run_dir / "summary.md", "\n".join(lines) + "\n")
