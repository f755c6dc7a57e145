"""The round loop, shared by every method: draw → ask → update → evaluate → record → checkpoint.

One round: the engine draws what the method declares (`Method.draws`: images, image pairs, or recorded trajectories,
sharded over ranks with per-sample seeds so the result does not depend on the number of ranks; ePAPA's reference below
k), gives every query a stable id, saves the images under rounds/NNN/, asks the feedback source (rank 0; every rank
gets the answers, or the source's error) and waits where the source has no answer yet. The method turns the answers
into training tensors; its work list of UNet evaluations is split over ranks and pushed through the UNet in chunks
whose gradients accumulate (peak memory does not grow with T), gradients are all-reduced once per optimiser step, and
the evaluator judges a fixed-seed batch. Every round ends with an atomic checkpoint holding everything `--resume`
needs; the two newest are kept, and an unusable newest one falls back to the previous.

Everything random in a round derives from (train.seed, round), so a resumed run repeats an uninterrupted one exactly.
Models, the feedback source and the evaluator are objects handed in (`Engine(...)`); `Engine.from_config` builds them
from a config and the shipped files.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from papa import checkpoint, dist
from papa.algos import METHODS, get_method
from papa.config import Config, config_hash, dump_yaml, to_dict
from papa.evaluation import RunEvaluator
from papa.feedback import FeedbackSource, build_feedback
from papa.policy import FullPolicy, Policy
from papa.records import Records
from papa.rundir import BaseEvalCache, RunDir
from papa.rounds import Query, RoundData, Samples, image_id, pair_id, round_seed
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
    """The loss, gradients or weights became NaN/inf: the round is abandoned and the last good checkpoint kept."""


@dataclass
class RunState:
    round: int = 0                                   # rounds completed
    history: list = field(default_factory=list)      # per round: the method's training tensors (keeps_history)
    metrics: list = field(default_factory=list)      # rows written to metrics.jsonl
    elapsed: float = 0.0                             # seconds of training so far (across resumes)
    asked: dict = field(default_factory=dict)        # select: features "f", answers "y", model-picked "m" and round
                                                     # "r" of every image asked about


def default_sample_path(cfg: Config) -> str:
    t = cfg.train
    return t.sample_path or f"{t.algo}{METHODS[t.algo].run_tag(cfg.method())}_seed{t.seed}"


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
    def __init__(self, cfg: Config, run_dir: Path, policy: Policy, feedback: FeedbackSource, evaluator: RunEvaluator,
                 rank: int = 0, world: int = 1, device=torch.device("cpu"), base_eval_key: dict | None = None):
        """`base_eval_key`: what the base model's round-0 evaluation depends on (files by content, settings); with it
        that evaluation is cached and shared by every run of the same inputs, without it always recomputed."""
        self.cfg, self.run_dir, self.rank, self.world, self.device = cfg, Path(run_dir), rank, world, device
        self.main = rank == 0
        t = cfg.train
        self.policy, self.feedback, self.evaluator = policy, feedback, evaluator
        self.sched = NoiseSchedule.from_config(cfg.diffusion)
        self.method = get_method(t.algo)(cfg, policy, self.sched, device)
        if self.method.feedback not in getattr(feedback, "kinds", (self.method.feedback,)):
            from papa.config import ConfigError
            raise ConfigError(f"feedback source {type(feedback).__name__} cannot answer {self.method.feedback} queries "
                              f"(train.algo={t.algo}); use feedback.source: oracle")
        self.opt = torch.optim.Adam(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        # the evaluated model: the policy itself, or an exponential moving average of its weights (train.ema_decay)
        self.ema = copy.deepcopy(policy.module).eval().requires_grad_(False) if t.ema_decay > 0 else None
        self.records = Records(run_dir, self.main)
        self.dir = RunDir(run_dir, self.records.log)
        self.base_eval = BaseEvalCache(Path(cfg.train.output_dir) / cfg.task_name, base_eval_key, self.records.log)
        self.state = RunState()
        self._asking: tuple | None = None  # select: the features and record of the round's chosen candidates
        self._pool: tuple | None = None    # select: the round's pool, its features and the chosen indices
        # called as progress("update", steps done, steps in the round) after each optimiser step: how a front end (the
        # browser app, papa.serve) shows the update advancing; None for papa.train, whose bar is tqdm's
        self.progress: Callable[[str, int, int], None] | None = None

    @classmethod
    def from_config(cls, cfg: Config, run_dir: Path, rank: int = 0, world: int = 1,
                    device=torch.device("cpu"), feedback: FeedbackSource | None = None) -> "Engine":
        """The engine of a config: the shipped base model as the policy (every weight trained, or a LoRA adapter on it
        with adapter.rank > 0), the configured feedback source (or `feedback`),
        the evaluator with the dataset's test images. Every file is loaded (and checked) before anything is written."""
        from papa.data import load_dataset
        from papa.models import load_classifier, load_unet
        ck, ds = cfg.checkpoints, cfg.data.dataset  # every checkpoint must say it was made for this dataset, if it says
        base = load_unet(cfg.model, ck.base, dataset=ds).to(device)
        if cfg.adapter.rank > 0:
            from papa.adapters import AdapterPolicy
            policy = AdapterPolicy(base, cfg.adapter, seed=cfg.train.seed)
            # start from another adapter (e.g. a newcomer's mixture of prototype adapters); a run that has round
            # checkpoints resumes from them, so the starting file is needed only until the first one is written
            if cfg.adapter.init and (Path(cfg.adapter.init).is_file()
                                     or not checkpoint.round_files(Path(run_dir) / "checkpoints")):
                from papa.models import load_adapter
                try:
                    policy.load_module_state(policy.module, load_adapter(cfg.adapter.init, cfg.adapter, ds))
                except (ValueError, checkpoint.CheckpointError) as e:
                    raise checkpoint.CheckpointError(f"config key 'adapter.init': {e}; point it at an adapter run's "
                                                     "round checkpoint (or a mixture.pt of scripts/new_users.py) "
                                                     "made with this config's adapter.rank, alpha and targets") from None
        else:
            policy = FullPolicy(base)
        evaluator = load_classifier("evaluator", ck.evaluator, ds).to(device)
        if feedback is None:  # a caller may bring its own (papa.population: each user of a population)
            oracle = load_classifier("oracle", ck.oracle, ds).to(device) if cfg.feedback.source == "oracle" else None
            feedback = build_feedback(cfg, oracle)
        xte, yte = load_dataset(ds, "test", root=cfg.data.root or None)
        run_eval = RunEvaluator(evaluator, xte, yte, cfg, NoiseSchedule.from_config(cfg.diffusion), device)
        key = {"files": [checkpoint.sha256_file(p) for p in (ck.base, ck.evaluator)],  # by content, not size/time
               "model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion), "data": to_dict(cfg.data),
               "preference": cfg.feedback.preference, "num": cfg.eval.final_num, "seed": cfg.eval.seed,
               # round 0 of a run that starts from an adapter is that adapter's evaluation, not the base's
               **({"init": checkpoint.sha256_file(cfg.adapter.init)}
                  if cfg.adapter.rank > 0 and cfg.adapter.init and Path(cfg.adapter.init).is_file() else {})}
        return cls(cfg, run_dir, policy, feedback, run_eval, rank, world, device, base_eval_key=key)

    def log(self, msg: str) -> None:
        self.records.log(msg)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        s = self.state
        return self.dir.save(s.round, {
            "model": self.policy.state_dict(), "opt": self.opt.state_dict(), "round": s.round,
            **({"ema": self.policy.module_state(self.ema)} if self.ema is not None else {}),
            "history": s.history, "metrics": s.metrics, "elapsed": s.elapsed, "dataset": self.cfg.data.dataset,
            **({"asked": s.asked} if s.asked else {}),
            **({"adapter": to_dict(self.cfg.adapter)} if self.cfg.adapter.rank > 0 else {}),  # how to rebuild it
            "config_hash": config_hash(self.cfg), "torch_rng": torch.get_rng_state()})

    def _load_round(self, path: Path, n: int, force: bool) -> dict:
        """A round checkpoint checked for structure, provenance and fit, then loaded into the policy, optimiser and
        EMA (a failed load is followed by a full load of an earlier one, or the run stops)."""
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
        self.policy.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        if self.ema is not None:
            self.policy.load_module_state(self.ema, st["ema"])
        return st

    def try_resume(self, force: bool = False) -> bool:
        """Continue from the newest usable checkpoint (papa.rundir decides which, or refuses)."""
        st = self.dir.newest_usable(lambda path, n: self._load_round(path, n, force))
        if st is None:
            return False
        self.state = RunState(st["round"], st["history"], st["metrics"], st["elapsed"], st.get("asked", {}))
        torch.set_rng_state(st["torch_rng"])
        return True

    # ------------------------------------------------------------------ the round
    def sample_images(self, n: int, seed: int, k: int = 0, net: torch.nn.Module | None = None,
                      steps: int = 0) -> torch.Tensor:
        """n images from the policy (or `net`), the reference below step k (ePAPA), sharded over ranks, on every rank;
        `steps` sampling steps (0: diffusion.sample_steps)."""
        d, idx = self.cfg.diffusion, dist.shard(n, self.rank, self.world)
        net = self.policy.module if net is None else net
        local = sample(net, self.sched, len(idx), steps=steps or d.sample_steps, sampler=d.sampler, eta=d.eta,
                       seed=seed, first_index=idx.start, batch_size=self.cfg.eval.batch_size,
                       base_model=self.policy.reference_module if k else None, epapa_k=k, device=self.device,
                       progress=self.main and n > 50, cuda_graph=self.device.type == "cuda")
        return dist.gather_cat(local, self.world)

    def sample_trajectories(self, n: int, seed: int, paired: bool = False) -> Trajectories:
        """n recorded trajectories with the training sampler (train.traj_*), sharded over ranks (whole pairs)."""
        t = self.cfg.train
        unit = 2 if paired else 1
        idx = dist.shard(n // unit, self.rank, self.world)
        local = sample_trajectories(self.policy.module, self.sched, len(idx) * unit, steps=t.traj_steps,
                                    sampler=t.traj_sampler, eta=t.traj_eta, seed=seed, first_index=idx.start * unit,
                                    paired=paired, device=self.device)
        for k in ("x", "x0_hat", "log_prob"):
            local[k] = dist.gather_cat(local[k], self.world)
        return local

    def draw(self, r: int) -> Samples:
        """Round r's samples, as the method declares: P images, 2P images, P or 2P recorded trajectories; with a
        selector, the P images it picks from a pool."""
        m, P, seed = self.method, self.cfg.train.samples_per_round, round_seed(self.cfg.train.seed, r)
        if self.cfg.select.selector != "none":
            return self.draw_pool(r, P, seed)
        if m.draws in ("images", "image_pairs"):
            return Samples(self.sample_images(P * (2 if m.draws == "image_pairs" else 1), seed, m.base_below))
        traj = self.sample_trajectories(P * (2 if m.draws == "trajectory_pairs" else 1), seed,
                                        paired=m.draws == "trajectory_pairs")
        return Samples(traj.images, traj)

    def draw_pool(self, r: int, k: int, seed: int) -> Samples:
        """Round r's pool of select.pool_size images (candidate i is image i of a round without a pool), their
        features from the frozen base UNet, and the k the selector picks from the answers so far (papa.select).
        Every rank samples its shard, then all select the same (deterministic) k. The pool, dimmed where not
        chosen, goes to rounds/NNN/pool.png and the choice to pool.json."""
        from papa.select import choose, unet_features
        sc, a = self.cfg.select, self.state.asked
        t0 = time.time()
        pool = self.sample_images(sc.pool_size, seed, self.method.base_below, steps=sc.pool_sample_steps)
        t1 = time.time()
        feats = unet_features(self.policy.reference_module, self.sched, pool.to(self.device), sc.feature_t,
                              seed=self.cfg.train.seed)
        labelled = a.get("f", torch.zeros(0, feats.shape[1]))
        idx, rec = choose(sc, feats, labelled, a.get("y", torch.zeros(0)), k, seed, a.get("m"), a.get("r"))
        rec["round"] = r + 1
        rec.update(pool_seconds=round(t1 - t0, 2), select_seconds=round(time.time() - t1, 2))
        self._asking = (feats[idx], rec)
        self._pool = (pool, feats, idx)
        self.method.observe_draw(pool, r)
        if self.main:
            from papa.records import round_dir, save_grid
            shown = torch.full((len(pool),), False)
            shown[idx] = True
            save_grid(torch.where(shown[:, None, None, None], pool, (pool + 1) * 0.3 - 1),
                      round_dir(self.run_dir, r + 1) / "pool.png", nrow=16)
            checkpoint.atomic_write_text(round_dir(self.run_dir, r + 1) / "pool.json", json.dumps(rec, indent=1))
        return Samples(pool[idx])

    def query(self, r: int, samples: Samples) -> Query:
        """Round r's question: the images the method shows, an id for each query (image ids, or pair ids)."""
        m, shown = self.method, self.method.shown(samples)
        n = len(shown) // 2 if m.feedback == "pair" else len(shown)
        ids = [(pair_id if m.feedback == "pair" else image_id)(r + 1, i) for i in range(n)]
        return Query(r + 1, m.feedback, ids, shown)

    def ask(self, q: Query, images: torch.Tensor, while_waiting=None) -> torch.Tensor:
        """Save the round's `images` (rank 0), then ask the feedback source until it answers; every rank gets the
        answers, or the source's error. Each poll is one collective, so a long wait never times out the others.
        `while_waiting` (every rank) runs once, after the first "not yet", or after the answers where they came at
        once: work that needs no answer, done while a person is looking at the images."""
        dist.on_main(lambda: self.records.round_images(q.round, images), self.world, self.rank)
        moved = Query(q.round, q.kind, q.ids, q.images.to(self.device))
        waiting_since = None
        while True:
            answers = dist.on_main(lambda: self.feedback.ask(moved), self.world, self.rank)
            if answers is not None:
                break
            if while_waiting is not None:
                while_waiting()
                while_waiting = None
            if waiting_since is None:
                waiting_since = time.time()
                self.log(f"round {q.round}: waiting for {len(q.ids)} {q.kind} answers ({q.ids[0]} …) on the images "
                         f"in {self.run_dir / 'rounds' / f'{q.round:03d}'}")
            time.sleep(self.cfg.feedback.poll_seconds)
        if while_waiting is not None:
            while_waiting()
        answers = answers.cpu()
        if answers.shape[:1] != (len(q.ids),):
            raise RuntimeError(f"feedback source {type(self.feedback).__name__} gave {tuple(answers.shape)} answers "
                               f"for {len(q.ids)} queries")
        return answers

    def collect(self, r: int, while_waiting=None) -> RoundData:
        """Round r: draw, ask (running `while_waiting` while the answers are awaited), and let the method build its
        training tensors."""
        samples = self.draw(r)
        q = self.query(r, samples)
        answers = self.ask(q, samples.images, while_waiting)
        tensors, stats = self.method.build(samples, answers, q)
        if self.cfg.select.selector != "none":
            stats.update(self._remember_asked(answers))
        if self.cfg.select.pseudo_labels:
            tensors, more = self._add_pseudo_labels(r, tensors)
            stats.update(more)
        return RoundData(samples.images, self.method.record(q, answers), len(q.ids), tensors, stats)

    def _remember_asked(self, answers: torch.Tensor) -> dict:
        """Keep the asked images' features and answers for the next rounds' preference model; the round's selection
        facts: how well the model foresaw these answers, the pool's cost."""
        from papa.select import prediction_stats
        feats, rec = self._asking
        y = answers.float().reshape(-1)
        a = self.state.asked
        if not a:
            a.update(f=feats[:0], y=y[:0])
        if "m" not in a:             # a checkpoint from before these were kept: its images count as the model's picks
            a.update(m=torch.ones(len(a["y"]), dtype=torch.bool), r=torch.zeros(len(a["y"]), dtype=torch.long))
        m = torch.arange(len(y)) < rec["model_picks"]
        a.update(f=torch.cat([a["f"], feats]), y=torch.cat([a["y"], y]), m=torch.cat([a["m"], m]),
                 r=torch.cat([a["r"], torch.full((len(y),), rec["round"], dtype=torch.long)]))
        return {**prediction_stats(rec.get("p_like"), y), "pool_seconds": rec["pool_seconds"],
                "select_seconds": rec["select_seconds"], "select_fallback": int(rec["fallback"] is not None)}

    def _add_pseudo_labels(self, r: int, tensors: dict) -> tuple[dict, dict]:
        """The round's training tensors with the pool candidates the preference model labels (papa.select.
        pseudo_labels) appended, and a per-unit `trust`: 1 for the person's labels, select.pseudo_weight for the
        model's. The choice goes into rounds/NNN/pool.json beside the selection."""
        from papa.select import pseudo_labels
        sc, a = self.cfg.select, self.state.asked
        pool, feats, asked = self._pool
        idx, y, p = pseudo_labels(sc, feats, asked, a["f"], a["y"], round_seed(self.cfg.train.seed, r))
        n = len(tensors["y"])
        out = {"x": torch.cat([tensors["x"], pool[idx].cpu()]),
               "y": torch.cat([tensors["y"], y.to(tensors["y"].dtype)]),
               "trust": torch.cat([torch.ones(n), torch.full((len(idx),), sc.pseudo_weight)])}
        if self.main:
            from papa.records import round_dir
            rec = {**self._asking[1], "pseudo": idx, "pseudo_labels": [int(v) for v in y], "pseudo_p_like": p}
            checkpoint.atomic_write_text(round_dir(self.run_dir, r + 1) / "pool.json", json.dumps(rec, indent=1))
        return out, {"pseudo_positive": int((y > 0).sum()), "pseudo_negative": int((y < 0).sum())}

    # ------------------------------------------------------------------ evaluation
    @property
    def evaluated(self) -> torch.nn.Module:
        """The model that evaluations judge: the EMA of the policy when train.ema_decay > 0, else the policy."""
        return self.ema if self.ema is not None else self.policy.module

    def evaluate(self, num: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Evaluator metrics on `num` fixed-seed samples, the samples, and the evaluator's decision on each."""
        self.policy.eval()
        imgs = self.sample_images(num, self.cfg.eval.seed, self.method.base_below, net=self.evaluated)
        ev, pred = self.evaluator.judge_with_decisions(imgs, self.evaluated, self.policy.reference_module)
        return ev, imgs, pred

    # ------------------------------------------------------------------ update
    def update(self, data: dict, r: int, part: dict | None = None) -> dict:
        """The method's update: units shuffled into optimiser steps; each step's work list sharded over ranks and
        pushed through the UNet in chunks whose gradients accumulate; one all-reduce per optimiser step. A round's
        update may come in two parts (the replayed units before the answers, `Method.replayed`): the first is called
        with an empty `part` dict, which it fills, the second with that dict, and returns the round's totals."""
        t, m = self.cfg.train, self.method
        first = part is not None and not part
        gen = torch.Generator().manual_seed(t.seed * 7919 + r + (1_000_003 if first else 0))
        for g in self.opt.param_groups:  # a function of the round only, so a resumed run sets the same value
            g["lr"] = round_lr(t.lr, t.lr_decay, r, t.rounds)
        self.policy.train()
        part = {} if part is None else part
        if not part:
            part.update(losses=[], n_items=0, stats={})
        losses, stats = part["losses"], part["stats"]
        data = m.prepare(data, self.state.history)
        n = m.num_units(data)
        batches = [b for _ in range(t.epochs_per_round) for b in torch.randperm(n, generator=gen).split(t.batch_size)]
        bar = tqdm(batches, desc=f"round {r + 1} {'replay' if first else 'update'}", disable=not self.main,
                   leave=False, dynamic_ncols=True)
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
            dist.all_reduce_grads(self.policy.module, self.world, mean=ref_scale)
            total = dist.all_reduce_sum(total, self.world) / (self.world if ref_scale else 1)
            for k in m.stat_keys:  # the same keys on every rank: one collective each
                stats[k] = stats.get(k, 0.0) + dist.all_reduce_sum(st.get(k, 0.0), self.world)
            params = self.policy.parameters()
            grads_ok = all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
            if not math.isfinite(total) or not grads_ok:
                raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(total) else 'gradients'} "
                                    f"(loss {total}) in round {r + 1}")
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            self.opt.step()
            if self.ema is not None:  # identical on every rank: the all-reduced gradients gave identical weights
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.policy.module.parameters()):
                        pe.lerp_(pm, 1.0 - t.ema_decay)
            if not all(torch.isfinite(p).all() for p in params):  # e.g. a huge lr: finite grads,
                raise NonFiniteLoss(f"non-finite weights after an optimiser step in round {r + 1}")  # inf weights
            losses.append(total)
            part["n_items"] += len(items)
            bar.set_postfix(loss=f"{total:.4f}")
            if self.progress is not None and not first:
                self.progress("update", len(losses) - part.get("early_steps", 0), len(batches))
        bar.close()
        if first:
            part["early_steps"] = len(losses)
        return {"loss": sum(losses) / max(1, len(losses)), "optimizer_steps": len(losses),
                "unet_items": part["n_items"], **m.summarize(stats)}

    # ------------------------------------------------------------------ the loop
    def train_round(self, r: int) -> tuple[RoundData, dict]:
        """Round r's feedback and update, without its evaluation or checkpoint: (the round's data, the update's
        totals). What a feedback unit costs is this call's time over `data.queries` (bench/bench_methods.py)."""
        m, s = self.method, self.state
        # 1-2. draw from the current policy, save, ask (rank 0; all ranks agree), build the training tensors
        self.policy.eval()
        early, part = (m.replayed(s.history, r) if m.keeps_history else None), {}
        data = self.collect(r, None if early is None else lambda: self.update(early, r, part))
        self.records.round_labels(r + 1, data.labels)
        s.history.append(data.tensors if m.keeps_history else {})
        # 3. update on this round's feedback, or on it plus earlier rounds' (the method's training set), or on
        # it after the replayed units' steps, taken while the answers were awaited
        upd = self.update(m.training_set(data.tensors, s.history, r), r, part if early is not None else None)
        return data, upd

    def _record_eval(self, row: dict, num: int, tag: str) -> None:
        t0 = time.time()
        ev, imgs, pred = self.evaluate(num)
        row.update(ev)
        # the images of the first and last evaluations (eval.final_num of them) are kept for re-judging
        self.records.eval_grid(tag, imgs, pred, self.cfg.feedback.preference,
                               keep_images=num == self.cfg.eval.final_num)
        row["eval_seconds"] = round(time.time() - t0, 2)

    def _round0(self) -> dict:
        """Round 0: the base model's evaluation, from the shared cache where it is valid."""
        row = {"round": 0, "labels_used": 0, "elapsed": 0.0}
        # every rank reads the same file and reaches the same verdict, so they evaluate (collectively) or not together
        ev = self.base_eval.read(self.cfg.eval.final_num)
        grid = self.run_dir / "rounds" / "000" / "eval_grid.png"
        images = grid.with_name("eval_images.pt")
        if ev is not None:
            row.update(ev)
            row["eval_cached"] = True
            for kept, mine in ((self.base_eval.grid, grid), (self.base_eval.images, images)):
                if self.main and kept.is_file():
                    checkpoint.atomic_write_bytes(mine, kept.read_bytes())
            return row
        self._record_eval(row, self.cfg.eval.final_num, "000")
        if self.main:
            self.base_eval.write({k: v for k, v in row.items()
                                  if k not in ("round", "labels_used", "elapsed", "eval_seconds")}, grid.read_bytes(),
                                 images.read_bytes() if images.is_file() else None)
        return row

    def _open(self, resume: bool, force: bool, overwrite: bool) -> None:
        """Take the run directory (rank 0 locks, tidies and, for --overwrite, clears it; every rank learns the
        outcome), then load the checkpoint for --resume. Nothing is written before the lock is held, and a refused
        resume writes nothing but the lock file."""
        dist.on_main(lambda: self.dir.take(overwrite), self.world, self.rank)
        dist.barrier(self.world)
        if resume:
            self.try_resume(force)

    def run(self, resume: bool = False, force: bool = False, overwrite: bool = False) -> RunState:
        try:
            return self._run(resume, force, overwrite)
        finally:
            self.dir.release()

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
            self.records.line(row)
        for r in range(s.round, t.rounds):
            t0 = time.time()
            data, upd = self.train_round(r)
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
                self.records.metrics(s.metrics)
                self.save()
            dist.barrier(self.world)
            self.records.line(row)
        self.records.metrics(s.metrics)
        self.records.finish(cfg, default_sample_path(cfg), s.metrics, s.round, s.elapsed)
        return s
