"""Metrics on images, judged by a classifier's outputs and features: class histogram, confidence, preferred-class rate,
diversity, Fréchet distance on classifier features, and test accuracy.

Every run metric is judged by the *evaluator* classifier, never by the oracle that gives feedback. The FID here is the
Fréchet distance between Gaussians fitted to the evaluator's 128-d penultimate features (not Inception features: these
are 28×28 grey images), so its scale is papa's own; the floor is the FID between the test set's two halves.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def classify(evaluator: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (probabilities (N, 10), features (N, D)) of images in [−1, 1]."""
    evaluator.eval()
    probs, feats = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float()
        f = evaluator.features(x)
        feats.append(f)
        head = evaluator.head if hasattr(evaluator, "head") else None
        probs.append(torch.softmax(head(f), 1) if head is not None else evaluator(x).exp())
    return torch.cat(probs), torch.cat(feats)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), in float64 via symmetric eigendecompositions.

    Raises ValueError for inputs it cannot judge, rather than letting them surface as a LinAlgError deep in eigh or as
    a NaN: a covariance needs at least 2 samples per set (torch.cov of one row is NaN), and non-finite features (from
    a diverged model) have no Gaussian to fit."""
    for name, f in (("first", f1), ("second", f2)):
        if f.ndim != 2:
            raise ValueError(f"FID: the {name} feature set must be (N, D), got shape {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 samples in each set; the {name} has {f.shape[0]}")
        if not torch.isfinite(f).all():
            raise ValueError(f"FID: the {name} feature set holds non-finite values (NaN or inf), e.g. from a diverged "
                             "model; there is no distance to report")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"FID: feature dimensions differ ({f1.shape[1]} vs {f2.shape[1]})")
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def psd_sqrt(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r1 = psd_sqrt(s1)
    tr_cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_cross)


def class_stats(probs: torch.Tensor, preferred: list[int] | None = None) -> dict:
    """Class shares of the evaluator's decisions, and with `preferred` the user-facing rates.

    With a reject-aware evaluator (11 outputs, the last "not a member of any class") the decision is the argmax over
    all 11: `rejected_rate` is the share it calls no member of any class, and the headline `legible_preferred_rate`
    the share it accepts *and* puts in a preferred class. `preferred_rate` stays the argmax over the 10 classes only
    (what an argmax-only judge reports, blind to malformed samples), so the two can be read side by side. `class_fraction`
    (of all samples), `min_liked_share` (the smallest liked class's share of all samples), `diversity` (normalised
    entropy over the liked classes) and `preferred_fraction_within` are of the legible decisions."""
    k = probs.shape[1]
    reject = k == 11
    pred = probs.argmax(1)
    hist = torch.bincount(pred, minlength=k).float() / len(pred)
    out = {"num": len(pred), "class_fraction": [round(float(h), 4) for h in hist[:10]],
           "mean_confidence": float(probs.max(1).values.mean())}
    if reject:
        out["rejected_rate"] = float(hist[10])
    if preferred:
        pref = torch.tensor(preferred)
        out["legible_preferred_rate"] = float(torch.isin(pred, pref).float().mean())
        out["preferred_rate"] = float(torch.isin(probs[:, :10].argmax(1), pref).float().mean())
        out["min_liked_share"] = round(float(hist[pref].min()), 4)
        sub = hist[pref] / hist[pref].sum().clamp_min(1e-12)
        ent = -(sub * sub.clamp_min(1e-12).log()).sum()
        out["diversity"] = abs(float(ent / math.log(len(preferred)))) if len(preferred) > 1 else 1.0
        out["preferred_fraction_within"] = [round(float(s), 4) for s in sub]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)
