"""Training data for a classifier with a reject option: style augmentations that keep a digit legible, and synthetic
negatives ("not a member of any class", class index `REJECT_CLASS` = 10) that a malformed diffusion sample looks like.

Plain torch, no new dependency. Every function takes images `x` of shape (N, 1, H, W) (28 × 28 for MNIST /
Fashion-MNIST; the geometry assumes square images) in [−1, 1], background −1, ink towards +1, and returns the same
shape and range. All randomness comes from the `torch.Generator` passed in (sampled on the generator's device, then
moved to `x.device`), so one seed gives one result; nothing touches the global RNG. Internally the work is done on
the ink image p = (x + 1) / 2 in [0, 1], where background is exactly 0 (so zero padding in `grid_sample` and in
convolutions is background).

Style augmentations (`augment_style`) — an augmented image is still a legible member of its class
-------------------------------------------------------------------------------------------------
Composition, in this order, each step applied per image with its own probability (`DEFAULT_P`, or `p`):

1. stroke width, one draw decides between `thin` (probability p["thin"]) and `thick` (p["thick"]), never both:
   - `thick`: grey-level dilation of the [−1, 1] image, `max_pool(x)` over the 4-neighbour **cross** kernel (the
     pixel and its up/down/left/right neighbours, computed as the max of a 3×1 and a 1×3 max-pool), mixed with the
     image: x + s · (dilate(x) − x), s ~ U(0.5, 1). At s = 1 strokes grow by one pixel on each side (ink area ×1.8
     on the median MNIST digit): a bold digit.
   - `thin`: grey-level erosion `-max_pool(-x)` over the same cross kernel, mixed the same way, s ~ U(0.5, 1) but
     capped per image so that at least `THIN_MIN_INK` (60 %) of the image's ink remains. The mix and the cap exist
     because a full one-pixel erosion erases MNIST strokes: measured on 2000 test digits it keeps a median 24 % of
     the inked area and wipes out 1 % of the digits entirely. Because erosion is ≤ the image pixel-wise, `thin`
     never adds ink and `thick` never removes any.
2. one fused affine warp (`affine`, bilinear `F.affine_grid` / `F.grid_sample`, zero = background padding) whose
   factors are each drawn with their own probability, identity otherwise: image = shift ∘ scale ∘ rotate ∘ slant:
   - `slant`: horizontal shear x ← x + k·y, k ~ U(−0.3, 0.3) (area preserving),
   - `rotate`: angle ~ U(−12°, 12°),
   - `scale`: factor ~ U(0.85, 1.15) (isotropic, about the centre),
   - `shift`: dx, dy ~ U(−3, 3) px each.
   One resampling for all of them, so the image is blurred once, not four times.
3. `contrast`: p ← clamp(g · p^γ, 0, 1), γ log-uniform in [0.7, 1.4], gain g ~ U(0.9, 1.1). 0^γ = 0, so the
   background stays exactly −1 (dark); only the ink's grey levels and peak brightness change.

Synthetic negatives (`NEGATIVE_KINDS`, `make_negatives`) — each is "not a member of any class"
-------------------------------------------------------------------------------------------------
Each kind is a function `fn(x, gen, y=None, index=None)`: `x` (N real images) is the pool of sources, `y` optional
labels (N,), `index` the positions to build (default all, one negative per position, returned in that order).

Ink matching: every negative's total ink (sum of p over the image) is fitted into the ink range of the real batch
it was built from, [min, max] of ink(x), so that ink alone cannot tell a negative from a digit. `noise`, `blur`,
`broken` and `scribble` are fitted to the ink of the real image at their own position (so their ink distribution is
the batch's), `blend` to the ink of the bolder of its two sources, and `fragment` keeps its own, lower ink (see
below) but not below the batch minimum. The fit (`_fit_ink`) is peak preserving: too little ink → p ← clamp(s·p, 0, 1) with s ≥ 1 found by bisection (after a cross dilation when
the inked support is too small); too much → a soft threshold relative to the image's peak m,
p ← m·clamp((p/m − t)/(1 − t), 0, 1), that trims faint pixels and keeps pixels at the peak, preceded by (partial)
cross erosions when too many pixels sit at the peak, with a plain scale-down only as a last resort.

- `noise`: smooth random blobs. Gaussian white noise low-pass filtered (σ ~ U(1.8, 2.8) px), plus a broad centred
  bump (σ 6 px, centre jittered ±2 px) so the blobs sit where digits sit, thresholded at the per-image quantile that
  inks as many pixels as the source has ink, with a soft edge. Not a digit: filled, round, irregular regions a few
  pixels to ten wide, with no strokes of pen width, no loops around holes and no endpoints of lines.
- `blend`: the pixel-wise max (probability ½) or mean of two different real images (of different classes when `y`
  is given), shifted against each other by d/2 and −d/2, with |dx|, |dy| of d each ~ U(2, 6) px. The mean is
  brightened ×1.5 (a ghost: single strokes at ¾ ink, crossings full) so it is not a dim image. Not a member of any
  class: it shows two overlapping, misaligned digits (the "blend of two digits" failure of a diffusion model),
  offset by at least 2 px on each axis so they do not coincide. Needs N ≥ 2.
- `blend_apart`: `blend` with a partner chosen to show: of `APART_CANDIDATES` = 16 random partners (of another
  class when `y` is given), the one with the largest `stick_out`, the smaller of the two shares of ink that lie
  outside the other image's silhouette (its ink above `APART_INK` = 0.1, grown by a pixel), measured on the unshifted
  images. Why: a random partner often hides inside the source's silhouette or the source inside its own, and then the
  blend is a legible member (on Fashion-MNIST test images a quarter of random partners show under 1.1 % of the less
  visible garment's ink: a pullover over a shirt is a pullover); the median share is 0.38 for `blend_apart` against
  0.085 for `blend` there (MNIST: 0.42 against 0.20; `scripts/blend_probe.py`). Not a member of any class: two garments or digits a person
  sees as two.
- `blur`: a Gaussian blur (σ ~ U(2, 3) px) of a real image, renormalised to peak 1 ("as bright as ink") and then
  fitted to the source's ink (which trims the faint halo). Not a digit: at σ ≥ 2 px a 2–3 px pen stroke is smeared
  over ~10 px, so there are no strokes or edges, small loops fill in and nearby strokes merge into one soft cloud
  with at most the silhouette of the digit.
- `fragment`: a part of a real image: the ink on one side of a random half-plane, or in a sector around the ink's
  centroid (probability ½ each), cut where the kept ink reaches a fraction f ~ U(0.3, 0.6) of the source's ink
  (raised, if needed, so the fragment's ink is at least the batch minimum, never above 0.6). What keeps it from
  being a digit: at most `FRAGMENT_MAX_KEEP` = 60 % of the source's ink remains, in place and unscaled (no
  re-centring), so 40–70 % of the strokes are missing: open loops, stubs, a stroke without its partner. The
  fragment at position i is cut from image i when that image is eligible, else from a random eligible image of the
  batch: eligible = at least twice the batch's minimum ink (so the fragment stays in the ink range) and not a "1"
  (any piece of a 1 is a shorter 1): the class when `y` is given, else a stick-shaped ink distribution
  (principal-axis variance ratio above `ONE_ELONGATION` = 10; on the first 2000 MNIST test digits the 5 % quantile
  for 1s is 15.8 and the 95 % quantile of every other class below 9).
- `broken`: the source's strokes cut by 2–4 straight background bands 2–3 px wide, each through an ink pixel
  (drawn in proportion to ink) and roughly across the digit (perpendicular to its principal axis ± 45°), plus 1–3
  ink blotches (discs near the strokes) sized to make up the ink the cuts removed; the bands are applied after the
  blotches and stay empty through the ink fit, so no gap is bridged. Not a digit: loops are open and lines are
  interrupted and spotted — the "broken loops" failure.
- `scribble`: drawn from scratch (no real image is used except for its ink level): 2–5 random polylines of 2–3
  segments (a random walk with steps of 4–10 px inside the central 20 × 20 box), pen radius ~ U(1.0, 1.8) px, soft
  edge. When that is more ink than the target (a thin source), first the pen is thinned (to ×0.5), then only 2
  strokes of 2 segments are kept, then the drawing is shrunk about the centre (to ×0.4) — never dimmed. Not a
  digit: several unrelated crossing strokes with random turns — a tangle, not the stroke layout of any class.
- `flat`: a saturated slab over nearly the whole canvas, drawn from scratch: a rectangle whose margins sum to at
  most `FLAT_MAX_MARGIN` = 1.5 px per axis, brightness ~ U(0.95, 1), edges made ragged by smooth noise (±0.75 px)
  and 0.5–4 % of the pixels dark specks. It is the one kind whose ink is not matched to the batch: it stands for the
  collapse a policy can fall into when it is pushed away from everything shown to it (SDPO on every seed and PAPA
  on one, on Fashion-MNIST [5, 7, 9], docs/COMPARE.md), which no real image resembles: its mean ink is at least
  `FLAT_MIN_INK` = 0.8 of the canvas, and the brightest real training image reaches 0.752 on Fashion-MNIST and 0.398
  on MNIST. The MNIST evaluator shipped on 2026-12-07 is trained on it (its kinds are in `configs/mnist.yaml`); the
  other shipped judges were trained without it (`TRAINED_KINDS`); it is measured in every reject report.

Limits, honestly: these are heuristics. A small share of negatives can still read as a digit (a blob elongated like
a bold 1, a scribble that happens to form a 7, a blend whose second digit is mostly hidden, a blur of a 0 or a 1 whose
silhouette a person can still guess, a fragment that reads as a short stroke). Filtering by a trained classifier's
confidence is the caller's option; none is done here.

`negative_batch(x, y, gen, kinds=None)` returns one negative per input image, kinds drawn uniformly from `kinds`
(default `TRAINED_KINDS`: the six kinds the first reject-aware judges were trained on, without `flat` and
`blend_apart`), with their kind indices
(into `KIND_NAMES`); a caller mixes them into classifier training with target `REJECT_CLASS`.

Distance from the sources: no negative is a copy of a real image; the tests check that every negative's L2
distance (in [−1, 1] units, over 784 pixels) to every image of its source batch is at least `MIN_L2_TO_SOURCE` = 4
(one fully flipped pixel differs by 2, so 4 is four pixels' worth of full-ink change). Measured on 64 MNIST test
digits the smallest such distance is 5.5 (`blur`; 6.5 `broken`, ≥ 8.7 for the others), about the distance between
the two closest distinct real digits of that batch (5.5).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "REJECT_CLASS", "DEFAULT_P", "STYLE_OPS", "THIN_MIN_INK", "FRAGMENT_MAX_KEEP", "ONE_ELONGATION",
    "MIN_L2_TO_SOURCE", "ink", "ink_area", "thin", "thick", "affine", "contrast", "augment_style",
    "noise", "blend", "blur", "fragment", "broken", "scribble", "flat", "FLAT_MAX_MARGIN", "FLAT_MIN_INK",
    "blend_apart", "stick_out", "APART_INK", "APART_CANDIDATES",
    "NEGATIVE_KINDS", "KIND_NAMES", "TRAINED_KINDS", "make_negatives", "negative_batch",
]

REJECT_CLASS = 10
STYLE_OPS = ("thin", "thick", "slant", "rotate", "scale", "shift", "contrast")
DEFAULT_P: dict[str, float] = {"thin": 0.2, "thick": 0.2, "slant": 0.5, "rotate": 0.5, "scale": 0.5, "shift": 0.5,
                               "contrast": 0.5}
THIN_MIN_INK = 0.6
FRAGMENT_MAX_KEEP = 0.6
FRAGMENT_MIN_KEEP = 0.3
ONE_ELONGATION = 10.0
MIN_L2_TO_SOURCE = 4.0
FLAT_MAX_MARGIN = 1.5
FLAT_MIN_INK = 0.8
APART_INK = 0.1
APART_CANDIDATES = 16


# --------------------------------------------------------------------------- helpers


def _check(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"expected a float tensor (N, 1, H, W), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"expected square images, got {tuple(x.shape[2:])}")


def _to_p(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 0.5).clamp(0, 1)


def _to_x(p: torch.Tensor) -> torch.Tensor:
    return (p.clamp(0, 1) * 2 - 1).contiguous()


def _rand(gen: torch.Generator, n: int | tuple, device, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    shape = (n,) if isinstance(n, int) else n
    return (torch.rand(shape, generator=gen, device=gen.device) * (hi - lo) + lo).to(device)


def _randint(gen: torch.Generator, lo: int, hi: int, n: int, device) -> torch.Tensor:
    """Integers uniform in [lo, hi] (inclusive)."""
    return torch.randint(lo, hi + 1, (n,), generator=gen, device=gen.device).to(device)


def ink(x: torch.Tensor) -> torch.Tensor:
    """Total ink per image: sum of (x + 1) / 2 over the pixels, (N,)."""
    return _to_p(x).sum((1, 2, 3))


def ink_area(x: torch.Tensor) -> torch.Tensor:
    """Inked area per image: the number of pixels above mid-grey (x > 0), (N,) float."""
    return (x > 0).sum((1, 2, 3)).float()


def _cross_max(t: torch.Tensor) -> torch.Tensor:
    """Max over the 4-neighbour cross (3×1 ∪ 1×3); max-pool pads with −inf, so borders see no extra ink."""
    return torch.maximum(F.max_pool2d(t, (3, 1), 1, (1, 0)), F.max_pool2d(t, (1, 3), 1, (0, 1)))


def _coords(h: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (row, col), each (H, W) float, in pixels."""
    r = torch.arange(h, device=device, dtype=torch.float32)
    return torch.meshgrid(r, r, indexing="ij")


def _moments(p: torch.Tensor):
    """Centroid (cy, cx), principal-axis angle θ (radians, in image x/y with y down) and the ratio of the principal
    variances of each image's ink, from p (N, 1, H, W)."""
    yy, xx = _coords(p.shape[-1], p.device)
    w = p[:, 0]
    m = w.sum((1, 2)).clamp(min=1e-6)
    cy = (w * yy).sum((1, 2)) / m
    cx = (w * xx).sum((1, 2)) / m
    dy = yy - cy[:, None, None]
    dx = xx - cx[:, None, None]
    sxx = (w * dx * dx).sum((1, 2)) / m
    syy = (w * dy * dy).sum((1, 2)) / m
    sxy = (w * dx * dy).sum((1, 2)) / m
    half_tr = (sxx + syy) / 2
    disc = (half_tr ** 2 - (sxx * syy - sxy ** 2)).clamp(min=0).sqrt()
    l1, l2 = half_tr + disc, (half_tr - disc).clamp(min=1e-3)
    theta = 0.5 * torch.atan2(2 * sxy, sxx - syy)
    return cy, cx, theta, l1 / l2


def _gauss_blur(p: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ (N,), zero (background) padding."""
    n, _, h, w = p.shape
    rad = int(math.ceil(3 * float(sigma.max())))
    t = torch.arange(-rad, rad + 1, device=p.device, dtype=p.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(p.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)
    q = p.reshape(1, n, h, w)
    q = F.conv2d(q, k.view(n, 1, -1, 1), padding=(rad, 0), groups=n)
    q = F.conv2d(q, k.view(n, 1, 1, -1), padding=(0, rad), groups=n)
    return q.reshape(n, 1, h, w)


def _fit_ink(p: torch.Tensor, target: torch.Tensor, keep_out: torch.Tensor | None = None,
             iters: int = 40) -> torch.Tensor:
    """Change each image's ink (sum of p) to `target` (N,), peak preserving (see the module docstring).
    `keep_out` (N, 1, H, W) bool: pixels forced to background after any dilation."""
    p = p.clamp(0, 1)
    target = target.to(p.dtype)
    out = p.clone()
    cur = p.sum((1, 2, 3))

    up = cur < target
    if up.any():
        q = p[up]
        tq = target[up]
        ko = keep_out[up] if keep_out is not None else None
        for _ in range(4):  # grow the support until saturating it can reach the target
            small = (q > 1e-3).sum((1, 2, 3)).float() < tq
            if not small.any():
                break
            d = _cross_max(q[small])
            if ko is not None:
                d = d.masked_fill(ko[small], 0)
            q[small] = torch.maximum(q[small], 0.5 * d)
        q = torch.where(q > 1e-3, q, torch.zeros_like(q))
        lo = torch.zeros(len(q), device=p.device)
        hi = torch.full((len(q),), math.log(1e3), device=p.device)
        for _ in range(iters):
            mid = (lo + hi) / 2
            val = (q * mid.exp()[:, None, None, None]).clamp(0, 1).sum((1, 2, 3))
            big = val > tq
            hi = torch.where(big, mid, hi)
            lo = torch.where(big, lo, mid)
        out[up] = (q * lo.exp()[:, None, None, None]).clamp(0, 1)

    down = cur > target
    if down.any():
        q = p[down]
        tq = target[down]
        tmax = 0.98
        # where even the hardest trim leaves too much (many pixels at the peak), erode first: the mix
        # q + s·(erode(q) − q), s in [0, 1] by bisection, at most 3 one-pixel erosions
        for _ in range(3):
            peak = q.flatten(1).amax(1).clamp(min=1e-6)
            heavy = (q >= tmax * peak[:, None, None, None]).sum((1, 2, 3)) * peak > tq
            if not heavy.any():
                break
            qh, th = q[heavy], tq[heavy]
            e = -_cross_max(-qh)
            a_, b_ = torch.zeros(len(qh), device=p.device), torch.ones(len(qh), device=p.device)
            for _ in range(iters // 2):
                mid = (a_ + b_) / 2
                big = (qh + mid[:, None, None, None] * (e - qh)).sum((1, 2, 3)) > th
                a_ = torch.where(big, mid, a_)
                b_ = torch.where(big, b_, mid)
            q[heavy] = qh + b_[:, None, None, None] * (e - qh)

        peak = q.flatten(1).amax(1).clamp(min=1e-6)[:, None, None, None]

        def thr(t):  # soft threshold relative to the image's peak: pixels at the peak keep it
            t = t[:, None, None, None]
            return peak * ((q / peak - t) / (1 - t)).clamp(0, 1)

        lo = torch.zeros(len(q), device=p.device)
        hi = torch.full((len(q),), tmax, device=p.device)
        for _ in range(iters):
            mid = (lo + hi) / 2
            big = thr(mid).sum((1, 2, 3)) > tq
            lo = torch.where(big, mid, lo)
            hi = torch.where(big, hi, mid)
        r = thr(hi)
        s = r.sum((1, 2, 3))
        scale = torch.where(s > tq, tq / s.clamp(min=1e-6), torch.ones_like(s))  # last resort: dim
        out[down] = r * scale[:, None, None, None]
    return out


def _affine_p(p: torch.Tensor, shear, angle, scale, dx, dy) -> torch.Tensor:
    """Warp p (N, 1, H, W) by shift ∘ scale ∘ rotate ∘ shear (per-image tensors; angle in radians, shift in px)."""
    n, _, h, _ = p.shape
    dev, dt = p.device, p.dtype
    one, zero = torch.ones(n, device=dev, dtype=dt), torch.zeros(n, device=dev, dtype=dt)
    c, s = torch.cos(angle), torch.sin(angle)
    R = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    S = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    A = scale[:, None, None] * (R @ S)                        # forward, normalised coordinates
    t = torch.stack([dx, dy], -1) * (2.0 / h)                 # px → normalised
    Ainv = torch.linalg.inv(A)
    theta = torch.cat([Ainv, -(Ainv @ t[:, :, None])], 2)     # output → input sampling positions
    grid = F.affine_grid(theta, list(p.shape), align_corners=False)
    return F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _translate_p(p: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    n = p.shape[0]
    one = torch.ones(n, device=p.device, dtype=p.dtype)
    return _affine_p(p, 0 * one, 0 * one, one, dx.to(p.dtype), dy.to(p.dtype))


# --------------------------------------------------------------------------- style augmentations


def _strength(x: torch.Tensor, strength) -> torch.Tensor:
    s = torch.as_tensor(strength, dtype=x.dtype, device=x.device)
    return s.expand(x.shape[0]).reshape(-1, 1, 1, 1) if s.ndim <= 1 else s


def thick(x: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Thicken by up to one pixel: x + s·(dilate(x) − x), dilate = max-pool over the 4-neighbour cross kernel.
    `strength` s in [0, 1], a number or one per image (N,)."""
    _check(x)
    s = _strength(x, strength)
    return (x + s * (_cross_max(x) - x)).clamp(-1, 1)


def thin(x: torch.Tensor, strength: float | torch.Tensor = 1.0, min_ink: float | None = None) -> torch.Tensor:
    """Thin by up to one pixel: x + s·(erode(x) − x), erode = −max-pool(−x) over the 4-neighbour cross kernel.
    Never adds ink anywhere. With `min_ink` (as `augment_style`, with `THIN_MIN_INK`), s is capped per image so that
    at least that fraction of the image's ink remains: a full erosion erases most of a thin digit."""
    _check(x)
    s = _strength(x, strength)
    ero = -_cross_max(-x)
    if min_ink is not None:
        s = torch.minimum(s, _thin_cap(_to_p(x), _to_p(ero), min_ink)[:, None, None, None])
    return (x + s * (ero - x)).clamp(-1, 1)


def _thin_cap(p: torch.Tensor, ero: torch.Tensor, min_ink: float) -> torch.Tensor:
    """(N,) the largest erosion strength that keeps `min_ink` of each image's ink (p, ero: ink images in [0, 1])."""
    ink0 = p.sum((1, 2, 3))
    return (1 - min_ink) * ink0 / (ink0 - ero.sum((1, 2, 3))).clamp(min=1e-6)


def affine(x: torch.Tensor, shear=0.0, angle_deg=0.0, scale=1.0, shift=(0.0, 0.0)) -> torch.Tensor:
    """One bilinear warp: shift ∘ scale ∘ rotate ∘ shear, about the image centre. Each parameter a number or one
    per image (N,); `shear` k maps x ← x + k·y (slant), `shift` = (dx, dy) in pixels; outside is background."""
    _check(x)
    n = x.shape[0]

    def per(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(n).clone()

    dx, dy = shift
    return _to_x(_affine_p(_to_p(x), per(shear), per(angle_deg) * (math.pi / 180), per(scale), per(dx), per(dy)))


def contrast(x: torch.Tensor, gamma=1.0, gain=1.0) -> torch.Tensor:
    """p ← clamp(gain · p^gamma, 0, 1) on the ink image p = (x + 1)/2: background (−1) stays −1."""
    _check(x)
    n = x.shape[0]
    g = torch.as_tensor(gamma, dtype=x.dtype, device=x.device).expand(n).reshape(-1, 1, 1, 1)
    k = torch.as_tensor(gain, dtype=x.dtype, device=x.device).expand(n).reshape(-1, 1, 1, 1)
    return _to_x(k * _to_p(x).pow(g))


def _probs(p) -> dict[str, float]:
    if p is None:
        probs = dict(DEFAULT_P)
    elif isinstance(p, Mapping):
        unknown = set(p) - set(STYLE_OPS)
        if unknown:
            raise ValueError(f"unknown style op(s) {sorted(unknown)}; choose from {STYLE_OPS}")
        probs = {k: float(p.get(k, 0.0)) for k in STYLE_OPS}
    else:
        probs = {k: float(p) for k in STYLE_OPS}
    for k, v in probs.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"probability for {k!r} must be in [0, 1], got {v}")
    return probs


def augment_style(x: torch.Tensor, gen: torch.Generator, p: float | Mapping[str, float] | None = None) -> torch.Tensor:
    """Legibility-preserving style augmentation (composition in the module docstring).

    `p`: None → `DEFAULT_P`; a number → that probability for every op in `STYLE_OPS`; a mapping → exactly the ops it
    names, with those probabilities (ops it does not name are off). `thin` and `thick` are exclusive: one uniform
    draw u per image thins when u < p_thin and thickens when u ≥ 1 − p_thick (both scaled down to sum to 1 if they
    exceed it). The generator is consumed the same way whatever `p` is, so changing one probability does not
    reshuffle the others' draws."""
    _check(x)
    probs = _probs(p)
    n, dev, dt = x.shape[0], x.device, x.dtype
    if n == 0:
        return x.clone()
    # all draws up front, in a fixed order
    u_morph = _rand(gen, n, dev)
    s_morph = _rand(gen, n, dev, 0.5, 1.0)
    fire = {k: _rand(gen, n, dev) < probs[k] for k in ("slant", "rotate", "scale", "shift", "contrast")}
    shear = _rand(gen, n, dev, -0.3, 0.3)
    angle = _rand(gen, n, dev, -12.0, 12.0) * (math.pi / 180)
    scale = _rand(gen, n, dev, 0.85, 1.15)
    dxy = _rand(gen, (n, 2), dev, -3.0, 3.0)
    gamma = torch.exp(_rand(gen, n, dev, math.log(0.7), math.log(1.4)))
    gain = _rand(gen, n, dev, 0.9, 1.1)

    pt, pk = probs["thin"], probs["thick"]
    if pt + pk > 1:
        pt, pk = pt / (pt + pk), pk / (pt + pk)
    do_thin = u_morph < pt
    do_thick = (u_morph >= 1 - pk) & ~do_thin

    out = x.clamp(-1, 1)
    if do_thin.any() or do_thick.any():
        p0 = _to_p(out)
        ero = _to_p(-_cross_max(-out))
        s_thin = torch.minimum(s_morph, _thin_cap(p0, ero, THIN_MIN_INK))   # keep ≥ THIN_MIN_INK of the ink
        dil = _to_p(_cross_max(out))
        s = torch.where(do_thin, s_thin, torch.where(do_thick, s_morph, torch.zeros_like(s_morph)))
        target = torch.where(do_thin[:, None, None, None], ero, dil)
        out = _to_x(p0 + s[:, None, None, None] * (target - p0))

    zero, one = torch.zeros(n, device=dev, dtype=dt), torch.ones(n, device=dev, dtype=dt)
    geo = fire["slant"] | fire["rotate"] | fire["scale"] | fire["shift"]
    if geo.any():
        warped = _affine_p(_to_p(out),
                           torch.where(fire["slant"], shear, zero), torch.where(fire["rotate"], angle, zero),
                           torch.where(fire["scale"], scale, one),
                           torch.where(fire["shift"], dxy[:, 0], zero), torch.where(fire["shift"], dxy[:, 1], zero))
        out = torch.where(geo[:, None, None, None], _to_x(warped), out)
    if fire["contrast"].any():
        c = _to_x(gain[:, None, None, None] * _to_p(out).pow(gamma[:, None, None, None]))
        out = torch.where(fire["contrast"][:, None, None, None], c, out)
    return out.contiguous()


# --------------------------------------------------------------------------- negatives


def _setup(x, y, index):
    _check(x)
    n = x.shape[0]
    if n == 0:
        raise ValueError("need at least one real image to build negatives from")
    if y is not None:
        y = torch.as_tensor(y, device=x.device).long().reshape(-1)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} labels for {n} images")
    if index is None:
        index = torch.arange(n, device=x.device)
    else:
        index = torch.as_tensor(index, device=x.device).long().reshape(-1)
    p = _to_p(x)
    ink_all = p.sum((1, 2, 3))
    return p, y, index, ink_all, ink_all.min(), ink_all.max()


def noise(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
          index: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth random blobs (low-pass Gaussian noise over a centred bump, thresholded into soft-edged ink)."""
    p, _, index, ink_all, _, _ = _setup(x, y, index)
    m, h, dev = len(index), p.shape[-1], p.device
    if m == 0:
        return x[:0].clone()
    v = torch.randn((m, 1, h, h), generator=gen, device=gen.device).to(dev, p.dtype)
    sigma = _rand(gen, m, dev, 1.8, 2.8)
    centre = (h - 1) / 2 + _rand(gen, (m, 2), dev, -2.0, 2.0)
    v = _gauss_blur(v, sigma)
    v = v / v.flatten(1).std(1).clamp(min=1e-6)[:, None, None, None]
    yy, xx = _coords(h, dev)
    r2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    v = v + 1.5 * torch.exp(-r2 / (2 * 6.0 ** 2))[:, None]
    target = ink_all[index]
    k = target.round().long().clamp(1, h * h - 1)
    srt = v.flatten(1).sort(1, descending=True).values
    tau = srt.gather(1, k[:, None] - 1)[:, 0]
    q = ((v - tau[:, None, None, None]) / 0.4 + 0.5).clamp(0, 1)
    return _to_x(_fit_ink(q, target))


def _partner_scores(n, m, index, y, gen, dev):
    """Random scores (m, n) for partners j ≠ i (of another class when y is given and one exists), −1 where not
    allowed, and the allowed mask."""
    if n < 2:
        raise ValueError("blend needs at least two real images")
    score = _rand(gen, (m, n), dev)
    ok = torch.ones(m, n, dtype=torch.bool, device=dev)
    ok[torch.arange(m, device=dev), index] = False
    if y is not None:
        other = y[None, :] != y[index][:, None]
        ok = torch.where(other.any(1, keepdim=True), ok & other, ok)
    return torch.where(ok, score, torch.full_like(score, -1.0)), ok


def _partners(n, m, index, y, gen, dev):
    """For each built position i, a partner j ≠ i (of another class when y is given and one exists)."""
    return _partner_scores(n, m, index, y, gen, dev)[0].argmax(1)


def _silhouette(p: torch.Tensor) -> torch.Tensor:
    """Where an image has ink (p > `APART_INK`), grown by a pixel (a 3 × 3 max): what another image's ink can hide in."""
    return F.max_pool2d((p > APART_INK).to(p.dtype), 3, 1, 1) > 0


def stick_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """min(share of a's ink outside b's silhouette, share of b's ink outside a's): how much of the less visible of two
    overlaid images shows beside the other, p in [0, 1], (m, 1, H, W) each → (m,)."""
    def out(u, v):
        return (u * ~_silhouette(v)).sum((1, 2, 3)) / u.sum((1, 2, 3)).clamp(min=1e-6)
    return torch.minimum(out(a, b), out(b, a))


def _apart_partners(p, index, y, gen, dev):
    """For each built position i, of `APART_CANDIDATES` random partners j ≠ i (of another class when y is given and
    one exists), the one that sticks out of i's silhouette most, measured by `stick_out` on the unshifted images."""
    n, m = p.shape[0], len(index)
    score, ok = _partner_scores(n, m, index, y, gen, dev)
    c = min(APART_CANDIDATES, n - 1)
    cand = score.topk(c, dim=1).indices                                        # (m, c), valid ones first
    valid = ok.gather(1, cand)
    so = stick_out(p[index].repeat_interleave(c, 0), p[cand.flatten()]).view(m, c)
    so = torch.where(valid, so, torch.full_like(so, -1.0))
    return cand.gather(1, so.argmax(1, keepdim=True))[:, 0]


def _blend(x, gen, y, index, return_info, apart):
    p, y, index, ink_all, _, _ = _setup(x, y, index)
    n, m, dev = p.shape[0], len(index), p.device
    if m == 0:
        return (x[:0].clone(), {}) if return_info else x[:0].clone()
    j = _apart_partners(p, index, y, gen, dev) if apart else _partners(n, m, index, y, gen, dev)
    mag = _rand(gen, (m, 2), dev, 2.0, 6.0)
    sign = torch.where(_rand(gen, (m, 2), dev) < 0.5, -1.0, 1.0)
    d = mag * sign
    use_max = _rand(gen, m, dev) < 0.5
    a = _translate_p(p[index], d[:, 0] / 2, d[:, 1] / 2)
    b = _translate_p(p[j], -d[:, 0] / 2, -d[:, 1] / 2)
    # bilinear sub-pixel shifts soften thin strokes: bring each back to peak 1 before combining
    a = a / a.flatten(1).amax(1).clamp(min=1e-6)[:, None, None, None]
    b = b / b.flatten(1).amax(1).clamp(min=1e-6)[:, None, None, None]
    q = torch.where(use_max[:, None, None, None], torch.maximum(a, b), (0.75 * (a + b)).clamp(0, 1))
    out = _to_x(_fit_ink(q, torch.maximum(ink_all[index], ink_all[j])))
    if return_info:
        return out, {"src": index, "partner": j, "shift_src": d / 2, "shift_partner": -d / 2, "use_max": use_max}
    return out


def blend(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None, index: torch.Tensor | None = None,
          return_info: bool = False):
    """Max (½) or mean of two different real images shifted against each other by ±d/2, |dx|, |dy| ~ U(2, 6) px.
    With `return_info`, also {"src", "partner", "shift_src" (m, 2), "shift_partner" (m, 2) (dx, dy px),
    "use_max" (m,) bool}."""
    return _blend(x, gen, y, index, return_info, apart=False)


def blend_apart(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
                index: torch.Tensor | None = None, return_info: bool = False):
    """`blend` with the partner, of `APART_CANDIDATES` random ones, that sticks out of the source's silhouette most
    (and the source out of its): two overlaid images a person sees as two, not one hidden inside the other."""
    return _blend(x, gen, y, index, return_info, apart=True)


def blur(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
         index: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur with σ ~ U(2, 3) px, renormalised to peak 1 and fitted to the source's ink."""
    p, _, index, ink_all, _, _ = _setup(x, y, index)
    m, dev = len(index), p.device
    if m == 0:
        return x[:0].clone()
    sigma = _rand(gen, m, dev, 2.0, 3.0)
    q = _gauss_blur(p[index], sigma)
    q = q / q.flatten(1).max(1).values.clamp(min=1e-6)[:, None, None, None]
    return _to_x(_fit_ink(q, ink_all[index]))


def fragment(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
             index: torch.Tensor | None = None, return_info: bool = False):
    """The source's ink on one side of a random half-plane or in a sector around its centroid, at most
    `FRAGMENT_MAX_KEEP` of the source's ink. With `return_info`, also {"src" (m,) source index, "keep" (m,) kept
    fraction of the source's ink}."""
    p, y, index, ink_all, lo, _ = _setup(x, y, index)
    n, m, h, dev = p.shape[0], len(index), p.shape[-1], p.device
    if m == 0:
        return (x[:0].clone(), {}) if return_info else x[:0].clone()
    cy, cx, _, elong = _moments(p)
    not_one = (y != 1) if y is not None else (elong <= ONE_ELONGATION)
    rich = ink_all >= lo / 0.5            # a 50 % fragment still reaches the batch's minimum ink
    eligible = not_one & rich
    if not eligible.any():
        eligible = not_one if not_one.any() else torch.ones(n, dtype=torch.bool, device=dev)
    score = _rand(gen, (m, n), dev)
    own = eligible[index]
    other = torch.where(eligible[None, :], score, torch.full_like(score, -1.0)).argmax(1)
    src = torch.where(own, index, other)

    f = _rand(gen, m, dev, FRAGMENT_MIN_KEEP, FRAGMENT_MAX_KEEP)
    f = torch.maximum(f, lo / ink_all[src].clamp(min=1e-6)).clamp(max=FRAGMENT_MAX_KEEP)
    theta = _rand(gen, m, dev, -math.pi, math.pi)
    sector = _rand(gen, m, dev) < 0.5

    yy, xx = _coords(h, dev)
    dy = yy[None] - cy[src, None, None]
    dx = xx[None] - cx[src, None, None]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    key_plane = -(dx * c + dy * s)                                 # keep the far side along θ first
    ang = torch.atan2(dy, dx) - theta[:, None, None]
    key_sector = torch.atan2(torch.sin(ang), torch.cos(ang)).abs()  # angular distance from θ
    key = torch.where(sector[:, None, None], key_sector, key_plane).flatten(1)
    ps = p[src].flatten(1)
    order = key.argsort(1)
    cum = ps.gather(1, order).cumsum(1)
    keep_sorted = cum <= (f * ink_all[src])[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    q = (ps * keep).view(m, 1, h, h)
    kept = q.sum((1, 2, 3))
    target = torch.minimum(torch.maximum(kept, lo.expand(m)), FRAGMENT_MAX_KEEP * ink_all[src])
    q = _fit_ink(q, target)
    out = _to_x(q)
    if return_info:
        return out, {"src": src, "keep": q.sum((1, 2, 3)) / ink_all[src].clamp(min=1e-6)}
    return out


def _seg_dist(yy, xx, a, b):
    """Distance from pixel centres (H, W) to segments a→b (..., 2) as (row, col): (..., H, W)."""
    ay, ax = a[..., 0, None, None], a[..., 1, None, None]
    by, bx = b[..., 0, None, None], b[..., 1, None, None]
    vy, vx = by - ay, bx - ax
    t = (((yy - ay) * vy + (xx - ax) * vx) / (vy * vy + vx * vx).clamp(min=1e-6)).clamp(0, 1)
    return torch.sqrt((yy - ay - t * vy) ** 2 + (xx - ax - t * vx) ** 2)


def broken(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
           index: torch.Tensor | None = None) -> torch.Tensor:
    """Strokes cut by 2–4 background bands (2–3 px wide, across the digit) plus 1–3 blotches near the strokes."""
    p, _, index, ink_all, lo, hi = _setup(x, y, index)
    m, h, dev = len(index), p.shape[-1], p.device
    if m == 0:
        return x[:0].clone()
    src = p[index]
    _, _, axis, _ = _moments(src)
    yy, xx = _coords(h, dev)
    L, B = 4, 3
    n_lines = _randint(gen, 2, 4, m, dev)
    w = src.flatten(1) + 1e-6
    anchor = torch.multinomial(w.to(gen.device), L + B, replacement=True, generator=gen).to(dev)
    ay, ax = (anchor // h).float(), (anchor % h).float()
    phi = axis[:, None] + math.pi / 2 + _rand(gen, (m, L), dev, -math.pi / 4, math.pi / 4)
    width = _rand(gen, (m, L), dev, 2.0, 3.0)
    # distance from each pixel to the line through the anchor with direction φ
    dist = ((yy[None, None] - ay[:, :L, None, None]) * torch.cos(phi)[..., None, None]
            - (xx[None, None] - ax[:, :L, None, None]) * torch.sin(phi)[..., None, None]).abs()
    active = torch.arange(L, device=dev)[None] < n_lines[:, None]
    cut = ((dist < width[..., None, None] / 2) & active[..., None, None]).any(1, keepdim=True)

    n_blot = _randint(gen, 1, 3, m, dev)
    off_ang = _rand(gen, (m, B), dev, -math.pi, math.pi)
    off_len = _rand(gen, (m, B), dev, 2.0, 5.0)
    by = (ay[:, L:] + off_len * torch.sin(off_ang)).clamp(2, h - 3)
    bx = (ax[:, L:] + off_len * torch.cos(off_ang)).clamp(2, h - 3)
    deficit = (src * cut).sum((1, 2, 3))
    radius = torch.sqrt((deficit / n_blot + math.pi * 1.5 ** 2) / math.pi).clamp(1.2, 3.5)
    rb = radius[:, None] * _rand(gen, (m, B), dev, 0.8, 1.2)
    d = torch.sqrt((yy[None, None] - by[..., None, None]) ** 2 + (xx[None, None] - bx[..., None, None]) ** 2)
    bactive = torch.arange(B, device=dev)[None] < n_blot[:, None]
    blots = ((rb[..., None, None] + 0.5 - d).clamp(0, 1) * bactive[..., None, None]).amax(1, keepdim=True)
    q = torch.maximum(src, blots).masked_fill(cut, 0)
    return _to_x(_fit_ink(q, ink_all[index], keep_out=cut))


def scribble(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
             index: torch.Tensor | None = None) -> torch.Tensor:
    """2–5 random polylines (2–3 segments each, steps of 4–10 px in the central 20 × 20 box) drawn from scratch."""
    p, _, index, ink_all, _, _ = _setup(x, y, index)
    m, h, dev = len(index), p.shape[-1], p.device
    if m == 0:
        return x[:0].clone()
    S, K = 5, 3
    lo_b, hi_b = (h - 20) / 2, (h - 20) / 2 + 19
    n_strokes = _randint(gen, 2, 5, m, dev)
    n_segs = _randint(gen, 2, 3, m * S, dev).view(m, S)
    start = _rand(gen, (m, S, 2), dev, lo_b, hi_b)
    step_ang = _rand(gen, (m, S, K), dev, -math.pi, math.pi)
    step_len = _rand(gen, (m, S, K), dev, 4.0, 10.0)
    radius = _rand(gen, (m, S), dev, 1.0, 1.8)
    pts = [start]
    for k in range(K):
        nxt = pts[-1] + torch.stack([step_len[..., k] * torch.sin(step_ang[..., k]),
                                     step_len[..., k] * torch.cos(step_ang[..., k])], -1)
        pts.append(nxt.clamp(lo_b, hi_b))
    pts = torch.stack(pts, 2)                                       # (m, S, K+1, 2)
    yy, xx = _coords(h, dev)
    seg_on = (torch.arange(K, device=dev)[None, None] < n_segs[..., None]) & \
             (torch.arange(S, device=dev)[None, :, None] < n_strokes[:, None, None])
    target = ink_all[index]

    few_on = (torch.arange(K, device=dev)[None, None] < 2) & (torch.arange(S, device=dev)[None, :, None] < 2)

    def render(lam, rho, few):
        """The drawing shrunk about the box centre by lam, pen radius × rho, only 2 strokes of 2 segments where few
        (all (m,))."""
        c = (h - 1) / 2
        sp = (pts - c) * lam[:, None, None, None] + c
        dd = _seg_dist(yy, xx, sp[:, :, :-1], sp[:, :, 1:])
        on = torch.where(few[:, None, None], seg_on & few_on, seg_on)
        dd = torch.where(on[..., None, None], dd, torch.full_like(dd, 1e3))
        r = (radius * rho[:, None])[..., None, None, None]
        return (r + 0.5 - dd).clamp(0, 1).amax((1, 2))[:, None]

    def largest(f, lo):
        """Per image, the largest parameter in [lo, 1] whose ink f(param) stays ≤ target (lo if none does)."""
        a, b = torch.full((m,), lo, device=dev), torch.ones(m, device=dev)
        ok_b = f(b).sum((1, 2, 3)) <= target
        for _ in range(10):
            mid = (a + b) / 2
            big = f(mid).sum((1, 2, 3)) > target
            b = torch.where(big, mid, b)
            a = torch.where(big, a, mid)
        return torch.where(ok_b, torch.ones_like(a), a)

    # too much ink for the target (a thin source): thinner pen, then fewer strokes, then a smaller drawing — never
    # dimmer (the last few per cent are trimmed from the soft edges by the ink fit)
    one = torch.ones(m, device=dev)
    few = torch.zeros(m, dtype=torch.bool, device=dev)
    rho = largest(lambda v: render(one, v, few), 0.5)
    few = render(one, rho, few).sum((1, 2, 3)) > target
    lam = largest(lambda v: render(v, rho, few), 0.4)
    return _to_x(_fit_ink(render(lam, rho, few), target))


def flat(x: torch.Tensor, gen: torch.Generator, y: torch.Tensor | None = None,
         index: torch.Tensor | None = None) -> torch.Tensor:
    """A saturated slab over nearly the whole canvas (margins ≤ `FLAT_MAX_MARGIN` px per axis), ragged edges, a few
    dark specks; drawn from scratch, its ink deliberately above any real image's."""
    p, _, index, _, _, _ = _setup(x, y, index)
    m, h, dev = len(index), p.shape[-1], p.device
    if m == 0:
        return x[:0].clone()
    margin = _rand(gen, (m, 2), dev, 0.0, FLAT_MAX_MARGIN)          # per axis: the two margins' sum
    split = _rand(gen, (m, 2), dev)
    lo = margin * split                                               # top / left
    hi = (h - 1) - margin * (1 - split)                               # bottom / right
    yy, xx = _coords(h, dev)
    inside = torch.minimum(torch.minimum(yy[None] - lo[:, 0, None, None], hi[:, 0, None, None] - yy[None]),
                           torch.minimum(xx[None] - lo[:, 1, None, None], hi[:, 1, None, None] - xx[None]))
    rough = torch.randn((m, 1, h, h), generator=gen, device=gen.device).to(dev, p.dtype)
    rough = _gauss_blur(rough, torch.full((m,), 1.5, device=dev))
    rough = rough / rough.flatten(1).abs().amax(1).clamp(min=1e-6)[:, None, None, None]   # in [−1, 1]
    q = (inside[:, None] + 1.0 + 0.75 * rough).clamp(0, 1) * _rand(gen, m, dev, 0.95, 1.0)[:, None, None, None]
    rate = _rand(gen, m, dev, 0.005, 0.04)[:, None, None, None]
    speck = _rand(gen, (m, 1, h, h), dev) < rate
    q = torch.where(speck, torch.minimum(q, _rand(gen, (m, 1, h, h), dev, 0.0, 0.5)), q)
    return _to_x(q)


NEGATIVE_KINDS: dict[str, Callable[..., torch.Tensor]] = {
    "noise": noise, "blend": blend, "blur": blur, "fragment": fragment, "broken": broken, "scribble": scribble,
    "flat": flat, "blend_apart": blend_apart,
}
KIND_NAMES: tuple[str, ...] = tuple(NEGATIVE_KINDS)
TRAINED_KINDS: tuple[str, ...] = ("noise", "blend", "blur", "fragment", "broken", "scribble")   # the first judges' six


def make_negatives(x: torch.Tensor, kind: str, gen: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
    """N negatives of one kind built from the N real images x (labels y optional), (N, 1, H, W) in [−1, 1]."""
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; choose one of {KIND_NAMES}")
    return NEGATIVE_KINDS[kind](x, gen, y)


def negative_batch(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
                   kinds: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative per input image, its kind drawn uniformly from `kinds` (default `TRAINED_KINDS`). Returns (images
    (N, 1, H, W), kind indices (N,) int64 into `KIND_NAMES`). The whole batch is every kind's pool of sources and ink
    range."""
    _check(x)
    names = list(TRAINED_KINDS if kinds is None else kinds)
    if not names:
        raise ValueError("kinds is empty")
    bad = [k for k in names if k not in NEGATIVE_KINDS]
    if bad:
        raise ValueError(f"unknown negative kind(s) {bad}; choose from {KIND_NAMES}")
    n = x.shape[0]
    pick = torch.randint(0, len(names), (n,), generator=gen, device=gen.device).to(x.device)
    ids = torch.tensor([KIND_NAMES.index(k) for k in names], device=x.device)[pick]
    out = torch.empty_like(x)
    for k in KIND_NAMES:                      # fixed order: deterministic generator use
        where = (ids == KIND_NAMES.index(k)).nonzero().flatten()
        if len(where):
            out[where] = NEGATIVE_KINDS[k](x, gen, y, index=where)
    return out, ids
