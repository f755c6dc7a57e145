"""papa.fidelity: precision / recall and density / coverage against hand computations and a double-loop reference,
its refusals, and ink / stroke-width drift on synthetic strokes.

Conventions checked here (see papa/fidelity.py): NND_k excludes the point itself; precision / recall use closed balls
(≤, Kynkäänniemi et al.'s code), density / coverage open balls (<, Naeem et al.'s prdc)."""
import math

import pytest
import torch
import torch.nn.functional as F

from papa.fidelity import (density_coverage, drift, fidelity_report, ink, knn_radii, perimeter, precision_recall,
                           stroke_width)


def pts(*xs):
    """1-D points as an (N, 1) tensor, or 2-D points given as tuples as (N, 2)."""
    return torch.tensor([x if isinstance(x, tuple) else (x,) for x in xs], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# by hand

def test_hand_1d_with_a_real_outlier():
    # real = {0, 1, 2, 10}, fake = {0.5, 5, 10.2}, k = 1.
    # NND_1(real): 0→1, 1→1, 2→1, 10→8 (to 2).  Closed real balls: [−1,1], [0,2], [1,3], [2,18].
    # precision: 0.5 ∈ [−1,1]; 5 ∈ [2,18]; 10.2 ∈ [2,18]               → 3/3 = 1 (the real outlier 10 inflates it)
    # NND_1(fake): 0.5→4.5 (to 5), 5→4.5 (to 0.5), 10.2→5.2 (to 5).  Fake balls: [−4,5], [0.5,9.5], [5,15.4].
    # recall: 0, 1, 2 ∈ [−4,5]; 10 ∈ [5,15.4]                                 → 4/4 = 1
    # density (open balls (−1,1), (0,2), (1,3), (2,18)): 0.5 lies in 2 of them, 5 in 1, 10.2 in 1 → 4/(1·3) = 4/3
    # coverage: (−1,1) ∋ 0.5, (0,2) ∋ 0.5, (1,3) holds no fake, (2,18) ∋ 5   → 3/4
    real, fake = pts(0, 1, 2, 10), pts(0.5, 5, 10.2)
    assert knn_radii(real, 1).tolist() == [1, 1, 1, 8]
    assert precision_recall(real, fake, k=1) == {"precision": 1.0, "recall": 1.0}
    dc = density_coverage(real, fake, k=1)
    assert dc["density"] == pytest.approx(4 / 3) and dc["coverage"] == 0.75


def test_far_fake_outlier_lowers_precision_and_density_not_recall_or_coverage():
    # real = {0, 1, 2, 3}, k = 1: every NND_1 = 1, balls [−1,1], [0,2], [1,3], [2,4].
    # fake = {0.5, 1.5, 2.5}: each lies in a real ball → precision 1; NND_1(fake) = 1 each, balls [−.5,1.5], [.5,2.5],
    #   [1.5,3.5] hold 0, 1, 2, 3 → recall 1. Open balls: 0.5 ∈ (−1,1),(0,2); 1.5 ∈ (0,2),(1,3); 2.5 ∈ (1,3),(2,4)
    #   → density 6/(1·3) = 2, every real ball is hit → coverage 1.
    # fake + {100}: 100 is in no real ball → precision 3/4; its own ball [2.5, 197.5] only adds real points already
    #   covered → recall 1; density 6/(1·4) = 1.5; coverage 1.
    real, fake = pts(0, 1, 2, 3), pts(0.5, 1.5, 2.5)
    assert precision_recall(real, fake, k=1) == {"precision": 1.0, "recall": 1.0}
    assert density_coverage(real, fake, k=1) == {"density": 2.0, "coverage": 1.0}
    with_outlier = torch.cat([fake, pts(100)])
    assert precision_recall(real, with_outlier, k=1) == {"precision": 0.75, "recall": 1.0}
    assert density_coverage(real, with_outlier, k=1) == {"density": 1.5, "coverage": 1.0}


def test_hand_2d_square_with_a_fake_outlier():
    # real = corners of the unit square, k = 1: every NND_1 = 1.
    # fake = (0.5, 0.5), (3, 3). (0.5, 0.5) is √0.5 ≈ 0.71 < 1 from every corner; (3, 3) is 2√2 from (1, 1), in no ball
    #   → precision 1/2, density (4 + 0)/(1·2) = 2, coverage 4/4 = 1.
    # NND_1(fake) = ‖(3,3) − (.5,.5)‖ = 2.5√2 ≈ 3.54 for both: every corner is within 0.71 of (.5,.5) → recall 1.
    real, fake = pts((0, 0), (1, 0), (0, 1), (1, 1)), pts((0.5, 0.5), (3, 3))
    assert knn_radii(fake, 1).tolist() == pytest.approx([2.5 * math.sqrt(2)] * 2)
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}
    assert density_coverage(real, fake, k=1) == {"density": 2.0, "coverage": 1.0}


def test_identical_sets_by_hand_with_boundary_ties():
    # real = fake = {0, 1, 3, 7}, k = 1: NND_1 = 1, 1, 2, 4; every point's nearest neighbour lies exactly ON its ball's
    # boundary, which tests the closed / open conventions:
    # closed balls [−1,1], [0,2], [1,5], [3,11] hold every point → precision = recall = 1.
    # open balls (−1,1), (0,2), (1,5), (3,11): 0 lies only in (−1,1) (|0−1| = 1 is not < 1), 1 only in (0,2), 3 only in
    #   (1,5) (|3−7| = 4 is not < 4), 7 only in (3,11) → density 4/(1·4) = 1, coverage 1.
    x = pts(0, 1, 3, 7)
    assert knn_radii(x, 1).tolist() == [1, 1, 2, 4]
    assert precision_recall(x, x.clone(), k=1) == {"precision": 1.0, "recall": 1.0}
    assert density_coverage(x, x.clone(), k=1) == {"density": 1.0, "coverage": 1.0}


def test_precision_recall_balls_are_closed():
    # real = {0, 1, 2, 3}, fake = {4, 5}, k = 1: NND_1(real) = 1 each, NND_1(fake) = 1 each.
    # 4 is exactly 1 from 3: on the boundary of [2, 4] → counted; 5 is 2 from 3 → not   → precision 1/2
    # 3 is exactly 1 from 4: on the boundary of [3, 5] → counted; 0, 1, 2 are ≥ 2 away → recall 1/4
    # (open balls would give 0 and 0; density / coverage use open balls: 4 ∉ (2, 4) → both 0)
    real, fake = pts(0, 1, 2, 3), pts(4, 5)
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 0.25}
    assert density_coverage(real, fake, k=1) == {"density": 0.0, "coverage": 0.0}


def test_identical_random_sets():
    # Without ties each open ball B(r_i, NND_k(r_i)) holds r_i and its k − 1 nearer neighbours: k points → density 1.
    x = torch.randn(200, 8)
    assert precision_recall(x, x.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    dc = density_coverage(x, x.clone(), k=5)
    assert dc["coverage"] == 1.0 and dc["density"] == pytest.approx(1.0, abs=1e-12)


def test_duplicates_are_neighbours_at_distance_zero():
    # x = {0, 0, 5}: the neighbour of the first 0 is the second 0 (distance 0), not itself excluded twice.
    assert knn_radii(pts(0, 0, 5), 1).tolist() == [0, 0, 5]
    assert knn_radii(pts(0, 0, 5), 2).tolist() == [5, 5, 5]


def test_mode_dropped_fake_set():
    # real = {0, 1, 2} ∪ {10, 11, 12}, fake = {0, 1, 2} (the second mode dropped), k = 1: every NND_1 = 1.
    # precision: each fake is a real point → 1. Fake balls [−1,1], [0,2], [1,3] hold 0, 1, 2 but not 10, 11, 12 →
    #   recall 3/6. Open real balls: each fake lies only in its own (its neighbours sit on the boundary) → density
    #   3/(1·3) = 1; the balls around 10, 11, 12 hold no fake → coverage 3/6.
    real, fake = pts(0, 1, 2, 10, 11, 12), pts(0, 1, 2)
    assert precision_recall(real, fake, k=1) == {"precision": 1.0, "recall": 0.5}
    assert density_coverage(real, fake, k=1) == {"density": 1.0, "coverage": 0.5}
    # the same in 2-D with random clusters: dropping one of two far-apart clusters halves recall and coverage
    a, b = torch.randn(100, 2), torch.randn(100, 2) + 50
    real2 = torch.cat([a, b])
    full, dropped = torch.cat([a, b]) + 0.05 * torch.randn(200, 2), a + 0.05 * torch.randn(100, 2)
    pr_full, pr_drop = precision_recall(real2, full), precision_recall(real2, dropped)
    dc_full, dc_drop = density_coverage(real2, full), density_coverage(real2, dropped)
    assert pr_drop["recall"] <= 0.5 < 0.8 < pr_full["recall"]
    assert dc_drop["coverage"] <= 0.5 < 0.8 < dc_full["coverage"]
    assert pr_drop["precision"] > 0.8 and dc_drop["density"] > 0.6


# ---------------------------------------------------------------------------------------------------------------------
# against a plain double-loop reference

def _ref_nnd(x, k):
    out = []
    for i in range(len(x)):
        d = sorted(math.dist(x[i], x[j]) for j in range(len(x)) if j != i)
        out.append(d[k - 1])
    return out


def reference(real, fake, k_pr, k_dc):
    """The definitions written out with Python loops over pairs."""
    r, g = real.tolist(), fake.tolist()
    rr_pr, rg_pr, rr_dc = _ref_nnd(r, k_pr), _ref_nnd(g, k_pr), _ref_nnd(r, k_dc)
    precision = sum(any(math.dist(gj, r[i]) <= rr_pr[i] for i in range(len(r))) for gj in g) / len(g)
    recall = sum(any(math.dist(ri, g[j]) <= rg_pr[j] for j in range(len(g))) for ri in r) / len(r)
    density = sum(math.dist(gj, r[i]) < rr_dc[i] for gj in g for i in range(len(r))) / (k_dc * len(g))
    coverage = sum(any(math.dist(r[i], gj) < rr_dc[i] for gj in g) for i in range(len(r))) / len(r)
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}, rr_dc


def test_vectorised_chunked_matches_double_loop_reference():
    real = torch.randn(60, 5)
    fake = 1.3 * torch.randn(45, 5) + 0.4  # wider and shifted: every metric strictly between its extremes
    want, radii = reference(real, fake, 3, 5)
    assert 0 < want["precision"] < 1 and 0 < want["recall"] < 1 and 0 < want["coverage"] < 1
    results = []
    for chunk in (1, 7, 16, 1024):
        got = {**precision_recall(real, fake, k=3, chunk=chunk), **density_coverage(real, fake, k=5, chunk=chunk)}
        assert got == pytest.approx(want, abs=1e-12)
        assert knn_radii(real, 5, chunk=chunk).tolist() == pytest.approx(radii, rel=1e-12)
        results.append(got)
    assert all(r == results[0] for r in results)  # bit-identical whatever the chunk size
    assert fidelity_report(real, fake, _strokes(), _strokes())["precision"] == want["precision"]


def test_float32_input_is_judged_in_float64():
    real, fake = torch.randn(50, 4), torch.randn(40, 4)
    assert precision_recall(real.float(), fake.float()) == precision_recall(real.double(), fake.double())
    assert density_coverage(real.float(), fake.float()) == density_coverage(real.double(), fake.double())


# ---------------------------------------------------------------------------------------------------------------------
# refusals

@pytest.mark.parametrize("real, fake, k, match", [
    (torch.randn(3, 2), torch.randn(10, 2), 3, "at least 4 real points"),
    (torch.randn(10, 2), torch.randn(3, 2), 3, "at least 4 fake points"),
    (torch.randn(10), torch.randn(10, 2), 3, "2-D"),
    (torch.randn(10, 2), torch.randn(10, 2, 1), 3, "2-D"),
    (torch.randn(10, 2), torch.randn(10, 3), 3, "dimensions differ"),
    (torch.randn(10, 0), torch.randn(10, 0), 3, "dimension 0"),
    (torch.randn(10, 2), torch.tensor([[float("nan"), 0.0]] * 10), 3, "non-finite"),
    (torch.tensor([[float("inf"), 0.0]] * 10), torch.randn(10, 2), 3, "non-finite"),
    (torch.randn(10, 2), torch.randn(10, 2), 0, "positive integer"),
    ([[0.0, 1.0]] * 10, torch.randn(10, 2), 3, "torch.Tensor"),
])
def test_precision_recall_refuses(real, fake, k, match):
    with pytest.raises(ValueError, match=match) as err:
        precision_recall(real, fake, k=k)
    assert "\n" not in str(err.value)  # one line
    if "fake points" in match:  # density / coverage needs only one fake point: see the next test
        return
    with pytest.raises(ValueError, match=match):
        density_coverage(real, fake, k=k)


def test_density_coverage_needs_k_plus_one_real_and_one_fake_point():
    with pytest.raises(ValueError, match="at least 6 real points"):
        density_coverage(torch.randn(5, 2), torch.randn(10, 2), k=5)
    with pytest.raises(ValueError, match="at least 1 fake points"):
        density_coverage(torch.randn(10, 2), torch.randn(0, 2), k=5)
    assert density_coverage(torch.randn(6, 2), torch.randn(1, 2), k=5)["coverage"] >= 0


def test_image_refusals():
    good = _strokes()
    for bad, match in ((good[:, 0], r"\(N, 1, H, W\)"), (good.repeat(1, 3, 1, 1), r"\(N, 1, H, W\)"),
                       (good[:0], "empty"), (torch.full_like(good, float("nan")), "non-finite")):
        with pytest.raises(ValueError, match=match):
            drift(bad, good)
        with pytest.raises(ValueError, match=match):
            drift(good, bad)
    with pytest.raises(ValueError, match="no real image has ink"):
        drift(good, -torch.ones_like(good))


# ---------------------------------------------------------------------------------------------------------------------
# ink, stroke width, drift

def _canvas():
    return -torch.ones(1, 1, 28, 28)


def _strokes():
    """Axis-aligned synthetic strokes of known width on 28 × 28 canvases in [−1, 1] (ink = 1, background = −1)."""
    out = []
    for r0, r1, c0, c1 in ((5, 7, 4, 24), (5, 8, 4, 24), (4, 22, 10, 13), (4, 22, 10, 12)):  # w 2, 3, 3, 2
        x = _canvas()
        x[..., r0:r1, c0:c1] = 1
        out.append(x)
    x = _canvas()  # an "L" of width 3
    x[..., 4:24, 6:9] = 1
    x[..., 20:23, 6:22] = 1
    out.append(x)
    x = _canvas()  # a "+" of width 2
    x[..., 4:24, 12:14] = 1
    x[..., 12:14, 4:24] = 1
    out.append(x)
    return torch.cat(out)


def _curved():
    """A ring of width 2 (radii 8–10) and a 45° stroke three pixels across each row."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    ring = torch.where((r >= 8) & (r < 10), 1.0, -1.0)[None, None]
    diag = _canvas()
    for i in range(4, 24):
        diag[..., i, i:i + 3] = 1
    return torch.cat([ring, diag])


def dilate3(x):
    """Ink grown by one pixel in every direction (3 × 3 max-pool): a band becomes 2 pixels wider."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def dilate2(x):
    """Ink grown by one pixel down and right (2 × 2 max-pool): a band becomes 1 pixel wider."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-1.0), 2, stride=1)


def test_ink_threshold_and_values():
    x = _canvas()
    x[..., 0, :3] = torch.tensor([0.0, 1e-3, 1.0])  # 0 (mid-grey) is not ink; anything brighter is
    assert ink(x).tolist() == [2 / 784]
    s = _strokes()
    assert ink(s)[:2].tolist() == [40 / 784, 60 / 784]  # 2 × 20 and 3 × 20 rectangles


def test_stroke_width_of_known_rectangles():
    # band w × L (w ≥ 2): A = wL, P = 2L + 2(w − 2), estimate 2A/P. 2 × 20 → 80/40 = 2; 3 × 20 → 120/42; 3 × 18 → 108/38
    s = _strokes()
    assert perimeter(s[:2] > 0).tolist() == [40, 42]
    assert stroke_width(s)[:4].tolist() == pytest.approx([2, 120 / 42, 108 / 38, 2])
    assert stroke_width(_canvas()).tolist() == [0.0]  # no ink, no stroke


def test_dilation_raises_ink_and_stroke_width():
    s = _strokes()
    w0 = stroke_width(s)
    # 3 × 3 dilation: the band grows by 1 pixel on EACH side, i.e. 2 px wider. On these 18–20 px strokes the estimate
    # rises by 1.5–1.9 (the ends grow too, which lowers it from 2); documented band 1.3–2.2.
    d3 = stroke_width(dilate3(s)) - w0
    assert ((d3 > 1.3) & (d3 < 2.2)).all(), d3
    # one pixel wider (2 × 2 dilation): rises by 0.8–0.9; documented band 0.6–1.6.
    d2 = stroke_width(dilate2(s)) - w0
    assert ((d2 > 0.6) & (d2 < 1.6)).all(), d2
    assert (ink(dilate3(s)) > ink(dilate2(s))).all() and (ink(dilate2(s)) > ink(s)).all()
    # curved and 45° strokes: the estimate still rises (by ≈ 2.8 and ≈ 3 under 3 × 3, see stroke_width's docstring)
    c = _curved()
    assert (stroke_width(dilate3(c)) - stroke_width(c) > 2).all()
    assert (stroke_width(dilate2(c)) - stroke_width(c) > 0.6).all()
    # as drift of the set: positive and of the right size
    d = drift(dilate3(s), s)
    assert d["ink_drift"] > 0.5 and d["stroke_fake"] - d["stroke_real"] == pytest.approx(float(d3.mean()))
    assert d["stroke_drift"] == pytest.approx(d["stroke_fake"] / d["stroke_real"] - 1)
    thinner = drift(s, dilate3(s))
    assert thinner["ink_drift"] < 0 and thinner["stroke_drift"] < 0


def test_identical_sets_have_zero_drift_and_blank_fakes_show_in_ink():
    s = torch.cat([_strokes(), _curved()])
    d = drift(s, s.clone())
    assert d["ink_drift"] == 0.0 and d["stroke_drift"] == 0.0 and d["ink_fake"] == d["ink_real"] > 0
    # half the fakes blank: ink halves, the stroke width of the inked ones is unchanged
    half = drift(torch.cat([s, -torch.ones_like(s)]), s)
    assert half["ink_drift"] == pytest.approx(-0.5) and half["stroke_drift"] == pytest.approx(0.0)


def test_fidelity_report_keys_and_values():
    real, fake = torch.randn(30, 4), torch.randn(20, 4) + 0.5
    s = _strokes()
    rep = fidelity_report(real, fake, s, dilate3(s), k_pr=2, k_dc=4)
    assert list(rep) == ["precision", "recall", "density", "coverage", "ink_fake", "ink_real", "ink_drift",
                         "stroke_fake", "stroke_real", "stroke_drift"]
    assert all(isinstance(v, float) for v in rep.values())
    assert rep == {**precision_recall(real, fake, k=2), **density_coverage(real, fake, k=4),
                   **{k: v for k, v in drift(dilate3(s), s).items()}}
