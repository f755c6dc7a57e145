"""papa.negatives: style augmentations keep digits legible-looking in the measurable ways (stroke width moves the
expected way, shift / slant keep the inked area), and every synthetic negative kind is in range, deterministic, no
copy of a real image, inside the real ink range, and built the way its docstring says (fragment ≤ 60 % of a source,
blend of two distinct sources, flat a saturated slab above any real image's ink). Real-digit tests use 64 MNIST test
images and skip when the data is not available."""
import math

import pytest
import torch

from papa import negatives as ng

N_REAL = 64


@pytest.fixture(scope="module")
def real():
    try:
        from papa.data import load_dataset, to_model_range
        x, y = load_dataset("mnist", "test", use_registries=False)
    except Exception as e:  # no cached / local MNIST on this machine
        pytest.skip(f"MNIST test set not available offline: {e}")
    return to_model_range(torch.from_numpy(x[:N_REAL])), torch.from_numpy(y[:N_REAL]).long()


@pytest.fixture(scope="module")
def synth():
    """Digit-like images without the dataset: rings and bars, 2–3 px pen, in [−1, 1]."""
    g = torch.Generator().manual_seed(7)
    n = 24
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    imgs = []
    for i in range(n):
        cy, cx = 14 + torch.rand(2, generator=g) * 4 - 2
        w = 1.0 + float(torch.rand(1, generator=g))
        if i % 2:
            r = 5 + 3 * float(torch.rand(1, generator=g))
            d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt().sub(r).abs()
        else:
            d = torch.maximum((xx - cx).abs(), ((yy - cy).abs() - 8).clamp(min=0))
        imgs.append((w + 0.5 - d).clamp(0, 1))
    p = torch.stack(imgs)[:, None]
    return p * 2 - 1, torch.arange(n) % 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _all_outputs(x, y, seed):
    """Every public random transform on x, with one generator seed each."""
    out = {"augment_style": ng.augment_style(x, _gen(seed), p=0.7)}
    for k in ng.KIND_NAMES:
        out[k] = ng.make_negatives(x, k, _gen(seed), y)
    out["negative_batch"] = ng.negative_batch(x, y, _gen(seed))[0]
    return out


def test_shapes_range_and_kinds(synth):
    x, y = synth
    for name, v in _all_outputs(x, y, 0).items():
        assert v.shape == x.shape and v.dtype == x.dtype, name
        assert torch.isfinite(v).all(), name
        assert v.min() >= -1 and v.max() <= 1, name
        assert v.max() > 0.5, f"{name}: no ink at all"
    imgs, kinds = ng.negative_batch(x, y, _gen(1), kinds=["blur", "scribble"])
    assert imgs.shape == x.shape and kinds.shape == (len(x),) and kinds.dtype == torch.int64
    assert set(kinds.tolist()) == {ng.KIND_NAMES.index("blur"), ng.KIND_NAMES.index("scribble")}
    assert ng.REJECT_CLASS == 10 and set(ng.NEGATIVE_KINDS) == set(ng.KIND_NAMES) == {
        "noise", "blend", "blur", "fragment", "broken", "scribble", "flat", "blend_apart"}
    assert set(ng.TRAINED_KINDS) == set(ng.KIND_NAMES) - {"flat", "blend_apart"}
    drawn = ng.negative_batch(torch.cat([x] * 4), torch.cat([y] * 4), _gen(2))[1]   # the default: trained kinds only
    assert set(drawn.tolist()) == {ng.KIND_NAMES.index(k) for k in ng.TRAINED_KINDS}
    with pytest.raises(ValueError, match="unknown negative kind"):
        ng.make_negatives(x, "smudge", _gen(0))
    with pytest.raises(ValueError, match="unknown negative kind"):
        ng.negative_batch(x, y, _gen(0), kinds=["blur", "smudge"])
    with pytest.raises(ValueError, match="at least two"):
        ng.blend(x[:1], _gen(0))
    with pytest.raises(ValueError, match="unknown style op"):
        ng.augment_style(x, _gen(0), p={"sheer": 1.0})
    with pytest.raises(ValueError):
        ng.augment_style(x[:, 0], _gen(0))


def test_deterministic_given_the_generator_and_global_rng_untouched(synth):
    x, y = synth
    state = torch.get_rng_state()
    a, b, c = _all_outputs(x, y, 3), _all_outputs(x, y, 3), _all_outputs(x, y, 4)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: same seed, different output"
        assert not torch.equal(a[name], c[name]), f"{name}: other seed, same output"
    ka, kc = ng.negative_batch(x, y, _gen(3))[1], ng.negative_batch(x, y, _gen(4))[1]
    assert torch.equal(ka, ng.negative_batch(x, y, _gen(3))[1]) and not torch.equal(ka, kc)


def test_thin_and_thick_move_ink_area_the_expected_way(real):
    x, _ = real
    area = ng.ink_area(x)
    for thinned in (ng.thin(x, 1.0), ng.augment_style(x, _gen(0), p={"thin": 1.0})):
        a = ng.ink_area(thinned)
        assert (thinned <= x + 1e-6).all(), "thinning added ink"
        assert (a <= area).all() and a.mean() < 0.9 * area.mean(), (a.mean(), area.mean())
    # the cap in augment_style: thinning keeps at least THIN_MIN_INK of each image's ink
    t = ng.augment_style(x, _gen(0), p={"thin": 1.0})
    assert (ng.ink(t) >= ng.THIN_MIN_INK * ng.ink(x) - 1e-3).all()
    for thickened in (ng.thick(x, 1.0), ng.augment_style(x, _gen(0), p={"thick": 1.0})):
        a = ng.ink_area(thickened)
        assert (thickened >= x - 1e-6).all(), "thickening removed ink"
        assert (a >= area).all() and a.mean() > 1.2 * area.mean(), (a.mean(), area.mean())


def test_shift_and_slant_keep_ink_area_within_25_percent(real):
    x, _ = real
    area = ng.ink_area(x)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def centroid(v):
        p = (v + 1) / 2
        m = p.sum((1, 2, 3))
        return torch.stack([(p[:, 0] * yy).sum((1, 2)) / m, (p[:, 0] * xx).sum((1, 2)) / m], 1)

    def col_centroid(v):
        p = (v + 1) / 2
        return (p * torch.arange(28.0)).sum((1, 2, 3)) / p.sum((1, 2, 3)).clamp(min=1e-6)

    shifted = ng.augment_style(x, _gen(5), p={"shift": 1.0})
    slanted = ng.augment_style(x, _gen(5), p={"slant": 1.0})
    for name, v in (("shift", shifted), ("slant", slanted)):
        ratio = ng.ink_area(v) / area
        assert ((ratio > 0.75) & (ratio < 1.25)).all(), (name, ratio.min(), ratio.max())
        change = (v - x).abs().amax((1, 2, 3))  # |k| or |d| near 0 is a near-identity draw: most, not all, move
        assert (change > 0.1).float().mean() > 0.9, f"{name} left images unchanged: {change}"
    moved = (centroid(shifted) - centroid(x)).norm(dim=1)
    assert moved.mean() > 1.0, moved.mean()  # U(−3, 3) px per axis: mean displacement ≈ 2.1 px
    # the extreme shear ±0.3: area within ±25 %, ink mass kept, and the top of the digit moves sideways
    for k in (-0.3, 0.3):
        v = ng.affine(x, shear=k)
        ratio = ng.ink_area(v) / area
        assert ((ratio > 0.75) & (ratio < 1.25)).all(), (k, ratio.min(), ratio.max())
        assert torch.allclose(ng.ink(v), ng.ink(x), rtol=0.05)
        dx = col_centroid(v[..., 4:12, :]) - col_centroid(x[..., 4:12, :])  # rows stay rows under a shear
        assert (dx * math.copysign(1, -k)).mean() > 1.0, (k, dx.mean())  # rows above centre shift against k


def test_contrast_keeps_background_dark(real):
    x, _ = real
    v = ng.augment_style(x, _gen(2), p={"contrast": 1.0})
    bg = x <= -1 + 1e-6
    assert (v[bg] == -1).all()
    assert not torch.equal(v, x)


def test_no_negative_is_a_copy_of_a_real_image(real):
    x, y = real
    outs = {k: ng.make_negatives(x, k, _gen(11), y) for k in ng.KIND_NAMES}
    outs["negative_batch"] = ng.negative_batch(x, y, _gen(11))[0]
    for name, v in outs.items():
        d = torch.cdist(v.flatten(1), x.flatten(1)).min(1).values  # to the nearest image of the source batch
        assert d.min() > ng.MIN_L2_TO_SOURCE, (name, d.min())


def test_negative_ink_within_the_real_range(real):
    x, y = real
    ink = ng.ink(x)
    lo, hi = ink.min() - 0.5, ink.max() + 0.5          # half a pixel of ink of tolerance
    for seed in (0, 1):
        for k in ng.TRAINED_KINDS:          # flat is the one kind above the real range on purpose (the next test)
            v = ng.ink(ng.make_negatives(x, k, _gen(seed), y))
            assert ((v >= lo) & (v <= hi)).all(), (k, v.min(), v.max(), lo, hi)
        # ink-matched kinds follow their own source's ink (so ink alone cannot tell them from digits)
        for k in ("noise", "blur", "broken", "scribble"):
            v = ng.ink(ng.make_negatives(x, k, _gen(seed), y))
            assert torch.allclose(v, ink, rtol=0.02, atol=0.5), (k, (v - ink).abs().max())


def test_flat_is_a_saturated_slab_brighter_than_any_real_image(real, synth):
    for x, y in (real, synth):
        p = (ng.flat(x, _gen(4), y) + 1) / 2
        cover = p.flatten(1).mean(1)
        assert (cover >= ng.FLAT_MIN_INK).all(), cover.min()          # the docstring's bound
        assert (cover > 3 * ((x + 1) / 2).flatten(1).mean(1).max()).all()   # MNIST digits: under a third of that
        assert ((p > 0.9).flatten(1).float().mean(1) >= 0.7).all()     # mostly saturated, not a grey field
        assert (p < 0.5).any((1, 2, 3)).all()                         # ragged edges and specks: never a pure block
    # built from nothing of the source but its count: other sources, same generator → same slabs
    x, y = synth
    assert torch.equal(ng.flat(x, _gen(4)), ng.flat(-x.flip(0), _gen(4)))


def test_fragment_keeps_at_most_60_percent_of_one_source(real):
    x, y = real
    for labels in (y, None):
        frag, info = ng.fragment(x, _gen(9), labels, return_info=True)
        src = info["src"]
        keep = ng.ink(frag) / ng.ink(x[src])
        assert (keep <= 0.6 + 1e-4).all(), keep.max()  # the documented bound (at most 60 % of the ink kept), not the module's constant
        assert (keep >= 0.15).all(), keep.min()
        assert torch.allclose(keep, info["keep"], atol=1e-4)
        # it is a piece of that source: almost all of its ink lies on the source's strokes
        p, ps = (frag + 1) / 2, (x[src] + 1) / 2
        on = (p * (ps > 0.02)).sum((1, 2, 3)) / p.sum((1, 2, 3))
        assert (on > 0.95).all(), on.min()
        if labels is not None:
            assert (y[src] != 1).all(), "a fragment of a 1 is still a 1"


def test_blend_combines_two_distinct_sources(real):
    x, y = real
    v, info = ng.blend(x, _gen(13), y, return_info=True)
    src, par = info["src"], info["partner"]
    assert (src != par).all() and (y[src] != y[par]).all()
    assert info["use_max"].any() and (~info["use_max"]).any()
    _, info_nolabel = ng.blend(x, _gen(13), None, return_info=True)
    assert (info_nolabel["src"] != info_nolabel["partner"]).all()
    ink_v = v > -0.5

    def coverage(i, shift):  # share of a (shifted) source's strong ink that the blend shows
        s = ng.affine(x[i], shift=(shift[:, 0], shift[:, 1])) > 0.2
        return (s & ink_v).sum((1, 2, 3)) / s.sum((1, 2, 3)).clamp(min=1)

    ca, cb = coverage(src, info["shift_src"]), coverage(par, info["shift_partner"])
    assert ca.median() > 0.6 and cb.median() > 0.6, (ca.median(), cb.median())
    assert (torch.minimum(ca, cb) > 0.2).float().mean() > 0.9, torch.minimum(ca, cb)
    # and it is far from either source alone, as placed in the blend
    for i, shift in ((src, info["shift_src"]), (par, info["shift_partner"])):
        placed = ng.affine(x[i], shift=(shift[:, 0], shift[:, 1]))
        assert (v - placed).flatten(1).norm(dim=1).min() > ng.MIN_L2_TO_SOURCE


def test_stick_out_against_hand_counted_squares():
    """Two 4 × 4 squares: a's ink outside b's silhouette (b's ink grown by a pixel) and b's outside a's, by hand."""
    a = torch.zeros(1, 1, 12, 12)
    b = torch.zeros(1, 1, 12, 12)
    a[..., 2:6, 2:6] = 1.0                    # 16 pixels
    b[..., 2:6, 6:10] = 1.0                   # beside a: b's silhouette covers a's column 5 only (4 of 16 pixels)
    assert float(ng.stick_out(a, b)) == pytest.approx(12 / 16)
    b2 = torch.zeros(1, 1, 12, 12)
    b2[..., 3:5, 3:5] = 1.0                   # inside a: none of it shows beside a
    assert float(ng.stick_out(a, b2)) == 0.0
    far = torch.zeros(1, 1, 12, 12)
    far[..., 8:12, 8:12] = 0.5                # apart (any ink above APART_INK counts): all of both shows
    assert float(ng.stick_out(a, far)) == 1.0


def test_blend_apart_picks_partners_that_stick_out(real):
    x, y = real
    p = (x + 1) / 2
    v, info = ng.blend_apart(x, _gen(13), y, return_info=True)
    src, par = info["src"], info["partner"]
    assert (src != par).all() and (y[src] != y[par]).all()
    apart = ng.stick_out(p[src], p[par])
    _, plain = ng.blend(x, _gen(13), y, return_info=True)
    rand = ng.stick_out(p[plain["src"]], p[plain["partner"]])
    # the best of 16 candidates: nine in ten partners stick out at least as much as the median random one
    assert apart.median() > rand.median() + 0.1, (apart.median(), rand.median())
    assert (apart >= rand.median()).float().mean() > 0.9
    # each is the best of its candidates: no other image of another class sticks out more than 0.25 further
    best = torch.stack([torch.where(y != y[i], ng.stick_out(p[i].expand_as(p), p), torch.tensor(-1.0)).max()
                        for i in src.tolist()])
    assert ((best - apart) < 0.25).float().mean() > 0.9
    for i, shift in ((src, info["shift_src"]), (par, info["shift_partner"])):
        placed = ng.affine(x[i], shift=(shift[:, 0], shift[:, 1]))
        assert (v - placed).flatten(1).norm(dim=1).min() > ng.MIN_L2_TO_SOURCE


def test_negative_batch_draws_every_kind_once_per_image(real):
    x, y = real
    imgs, kinds = ng.negative_batch(x, y, _gen(21))
    counts = torch.bincount(kinds, minlength=len(ng.KIND_NAMES))
    trained = torch.tensor([k in ng.TRAINED_KINDS for k in ng.KIND_NAMES])
    assert (counts[trained] > 0).all() and (counts[~trained] == 0).all() and counts.sum() == len(x), counts
    # a single-kind batch is that kind's negatives (same construction, whole batch as the pool)
    only, k = ng.negative_batch(x, y, _gen(22), kinds=["fragment"])
    assert (k == ng.KIND_NAMES.index("fragment")).all()
    assert (ng.ink(only) <= ng.FRAGMENT_MAX_KEEP * ng.ink(x).max() + 1e-3).all()
    assert not math.isnan(float(imgs.sum()))
