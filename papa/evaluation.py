"""How a run judges its model each evaluation: the evaluator's metrics on fixed-seed samples (with a reject-aware
evaluator the headline is the legible preferred rate: accepted and in a preferred class, beside the rejected rate); the FID, improved
precision / recall and density / coverage of the preferred-class samples against real test images of the preferred
classes on evaluator features, with the drift of their ink and stroke width (papa.fidelity); and a KL-to-base probe.

Built once per run (the test features and the probe are fixed), so every evaluation is comparable with every other,
and with other runs of the same config: the samples are drawn with `eval.seed`, the probe from it too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from papa.data import to_model_range
from papa.fidelity import fidelity_report, knn_radii
from papa.metrics import class_stats, classify, frechet_distance

# reported beside the FID in every evaluation (papa.fidelity): on evaluator features and simple image statistics
FIDELITY_KEYS = ("precision", "recall", "density", "coverage", "ink_drift", "stroke_drift")
FIDELITY_REAL = 1000
from papa.schedule import NoiseSchedule


# The bounds an aligned model is held to (docs/ALIGNMENT.md), on its final evaluation against the base model's round 0
# (the same evaluation seed): the legible preferred rate at least the dataset's target; every liked class at least
# half its fair share of all samples; rejected, precision and FID within these factors of the base's.
TARGET_RATE = {"mnist": 0.90, "fashion_mnist": 0.85}
REJECT_MAX, PRECISION_MIN, FID_MAX = 1.5, 0.9, 1.5
BOUNDS = ("rate", "liked", "rejected", "precision", "fid")
QUALITY_BOUNDS = ("rejected", "precision", "fid")   # how the images look, whatever their classes
SHARE_BOUNDS = ("liked",) + QUALITY_BOUNDS            # and no liked class starved


def bounds_met(final: dict, base: dict, n_liked: int, target: float) -> dict[str, bool | None]:
    """Which bounds one final evaluation meets (metrics.jsonl rows: `final` of the aligned model, `base` of round 0);
    None where a bound does not apply: its metric is missing from either row (an argmax-only evaluator has no rejected
    rate), or the base's is not finite. A final value that is there but not finite fails its bound: the FID and
    precision are NaN when too few samples are in a preferred class to measure them, which is a failure, not a pass."""
    def value(row, k):
        v = row.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def holds(k, ok):
        f, b = value(final, k), value(base, k)
        if f is None or b is None or not math.isfinite(b):
            return None
        return bool(math.isfinite(f) and ok(f, b))

    rate = value(final, "legible_preferred_rate")
    rate = value(final, "preferred_rate") if rate is None else rate
    liked = value(final, "min_liked_share")
    return {"rate": None if rate is None else rate >= target,     # NaN >= x is False
            "liked": None if liked is None else liked >= 0.5 / max(1, n_liked),
            "rejected": holds("rejected_rate", lambda f, b: f <= REJECT_MAX * max(b, 1e-9)),
            "precision": holds("precision", lambda f, b: f >= PRECISION_MIN * b),
            "fid": holds("fid_preferred", lambda f, b: f <= FID_MAX * b)}


def within(met: dict[str, bool | None], keys=BOUNDS) -> bool:
    """Every bound of `keys` that applies holds."""
    return all(met[k] is not False for k in keys)


class RunEvaluator:
    """The evaluator classifier, its features of the real preferred-class test images, and the KL probe."""

    def __init__(self, net: torch.nn.Module, test_x: np.ndarray, test_y: np.ndarray, cfg, sched: NoiseSchedule,
                 device: torch.device = torch.device("cpu")):
        self.net, self.preference, self.device = net.to(device).eval(), list(cfg.feedback.preference), device
        keep = np.isin(test_y.astype(np.int64), self.preference)
        if cfg.eval.real_max and keep.sum() > cfg.eval.real_max:  # a fixed, seeded subset of them
            where = np.flatnonzero(keep)
            sub = torch.randperm(len(where), generator=torch.Generator().manual_seed(cfg.eval.seed + 1))
            keep = np.zeros_like(keep)
            keep[where[np.sort(sub[:cfg.eval.real_max].numpy())]] = True
        _, self.test_feats = classify(self.net, to_model_range(torch.from_numpy(test_x[keep])).to(device))
        # the fidelity metrics' real set: a fixed subset of the preferred-class test images (k-NN radii are O(N²);
        # 1,000 real points against 200-500 samples keep the sets of a similar size), its radii computed once
        g = torch.Generator().manual_seed(cfg.eval.seed)
        pick = torch.randperm(int(keep.sum()), generator=g)[:FIDELITY_REAL]
        self.fid_real_images = to_model_range(torch.from_numpy(test_x[keep][pick.numpy()]))
        self.fid_real_feats = self.test_feats.cpu()[pick]
        self.fid_real_radii = ({k: knn_radii(self.fid_real_feats, k) for k in (3, 5)}
                               if len(pick) > 5 and torch.isfinite(self.fid_real_feats).all() else None)
        # a fixed probe for the KL-to-base diagnostic: real test images noised at fixed steps of the sampling chain
        g = torch.Generator().manual_seed(cfg.eval.seed)
        ts = torch.tensor(sched.sampling_timesteps(cfg.diffusion.sample_steps))
        j = torch.randint(0, len(ts) - 1, (64,), generator=g)  # never the last step (σ = 0)
        x0 = to_model_range(torch.from_numpy(test_x[torch.randperm(len(test_x), generator=g)[:64].numpy()]))
        pt, ptp = ts[j], ts[j + 1]
        self.probe = (sched.add_noise(x0, torch.randn(x0.shape, generator=g), pt).to(device), pt.to(device),
                      sched.fused_coefficients(pt, ptp, cfg.diffusion.sampler, cfg.diffusion.eta).to(device))

    @torch.no_grad()
    def kl_to_base(self, net: torch.nn.Module, base: torch.nn.Module) -> float:
        """Mean per-step KL(p_θ ‖ p_base) of the sampling chain on the fixed probe, nats per pixel (pixel mean); NaN
        for a deterministic sampler (DDIM with η = 0), whose steps have no density to compare."""
        x, t, coef = self.probe
        if not bool((coef[:, 2] > 0).all()):
            return math.nan
        d = net(x, t) - base(x, t)
        return float((coef[:, 1] ** 2 * d.square().flatten(1).mean(1) / (2 * coef[:, 2] ** 2)).mean())

    def judge(self, images: torch.Tensor, net: torch.nn.Module, base: torch.nn.Module) -> dict:
        """Metrics of `images` sampled from `net`: class shares, legible preferred and rejected rates, diversity,
        FID, fidelity and drift, KL to `base`."""
        return self.judge_with_decisions(images, net, base)[0]

    def judge_with_decisions(self, images: torch.Tensor, net: torch.nn.Module,
                             base: torch.nn.Module) -> tuple[dict, torch.Tensor]:
        """`judge`, and the evaluator's decision per image ((N,) class index; `REJECT_CLASS` for "not a member of
        any class" when the evaluator has a reject option)."""
        out, pred = self.judge_images(images)
        out["kl_to_base"] = self.kl_to_base(net, base)
        out["eval_num"] = len(images)
        return out, pred

    def judge_images(self, images: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Every metric of `judge_with_decisions` that needs only the images (all but the KL to the base), and the
        decisions: how a run's kept evaluation images are judged again by another evaluator (papa.rejudge)."""
        probs, feats = classify(self.net, images.to(self.device))
        out = class_stats(probs.cpu(), self.preference)
        pred = probs.argmax(1).cpu()
        sel = torch.isin(pred, torch.tensor(self.preference))  # legible and preferred: rejected samples excluded
        try:
            out["fid_preferred"] = frechet_distance(feats[sel].cpu(), self.test_feats.cpu())
        except ValueError:  # fewer than two preferred samples, or non-finite features: no distance to report
            out["fid_preferred"] = math.nan
        try:  # fidelity of what the evaluator calls preferred, against real images of those classes
            if self.fid_real_radii is None:
                raise ValueError("too few real preferred-class images for the fidelity metrics")
            rep = fidelity_report(self.fid_real_feats, feats[sel].cpu(), self.fid_real_images, images[sel].cpu(),
                                  real_radii=self.fid_real_radii)
            out.update({k: rep[k] for k in FIDELITY_KEYS})
        except ValueError:  # too few preferred samples for the k-nearest-neighbour radii, or non-finite ones
            out.update({k: math.nan for k in FIDELITY_KEYS})
        return out, pred
