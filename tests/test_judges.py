"""The reject option: the shipped reject-aware evaluator and oracle on real test images (plain, thinned, thickened)
and on each kind of synthetic negative; the metrics that read it; the realistic simulated user's likes."""
import functools
import json

import pytest
import torch

from papa import negatives as ng
from papa.config import ConfigError
from papa.data import load_dataset, to_model_range
from papa.feedback import OracleFeedback
from papa.metrics import class_stats
from papa.models import load_classifier
from papa.models.classifier import REJECT_CLASS, has_reject
from papa.rounds import Query
from testutil import ROOT

N_REAL, N_NEG = 600, 200          # small and fast; the manifest's figures use the whole test split
JUDGES = [(ds, kind) for ds in ("mnist", "fashion_mnist") for kind in ("evaluator", "oracle")]
# The share of each kind of held-out negative a shipped judge must reject. The aim is 95 % for every kind it was
# trained on, which both evaluators meet; where a judge falls short, or for a kind it was not trained on (the
# Fashion-MNIST evaluator's `blend`, random partners: a blend of two shirts is often a legible shirt, so it trains on
# `blend_apart` instead; docs/ALIGNMENT.md has the measured figures and why), the floor is set below what it measures,
# so that a retrained judge may not do worse unnoticed.
TARGET = 0.95
FLOORS = {("mnist", "evaluator"): {},
          ("mnist", "oracle"): {"blend": 0.80, "scribble": 0.90},
          ("fashion_mnist", "evaluator"): {"blend": 0.65},
          ("fashion_mnist", "oracle"): {"blend": 0.25, "blur": 0.70, "fragment": 0.60, "broken": 0.90,
                                        "scribble": 0.85}}


def floor(ds, kind, neg_kind):
    return FLOORS[(ds, kind)].get(neg_kind, TARGET)


@functools.lru_cache(maxsize=None)
def _test_images(ds):
    x, y = load_dataset(ds, "test")
    g = torch.Generator().manual_seed(11)
    pick = torch.randperm(len(x), generator=g)[:N_REAL].numpy()
    return to_model_range(torch.from_numpy(x[pick])), torch.from_numpy(y[pick]).long()


@functools.lru_cache(maxsize=None)
def _judge(ds, kind):
    return load_classifier(kind, ROOT / "checkpoints" / ds / f"{kind}_reject.pt", ds)


def _rejected(net, x):
    with torch.no_grad():
        return float((net(x).argmax(1) == REJECT_CLASS).float().mean())


@pytest.mark.parametrize("ds,kind", JUDGES)
def test_real_images_plain_thinned_and_thickened_are_accepted(ds, kind):
    net = _judge(ds, kind)
    assert has_reject(net)
    x, y = _test_images(ds)
    for name, images in (("plain", x), ("thinned", ng.thin(x, 1.0, min_ink=ng.THIN_MIN_INK)),
                         ("thickened", ng.thick(x, 1.0))):
        assert _rejected(net, images) <= 0.02, (ds, kind, name)   # the manifest: <= 1 % on the whole test split
    with torch.no_grad():
        assert float((net(x).argmax(1) == y).float().mean()) >= 0.85


@functools.lru_cache(maxsize=None)
def kinds_of(ds, kind):
    """The kinds of negative a shipped judge was trained on (its sidecar's `negative_kinds`; the first judges'
    six when it names none), each held to TARGET, and the kinds with a floor of their own."""
    side = json.loads((ROOT / "checkpoints" / ds / f"{kind}_reject.json").read_text())
    trained = side["config"][kind].get("negative_kinds") or ng.TRAINED_KINDS
    return tuple(dict.fromkeys([*trained, *FLOORS[(ds, kind)]]))


@pytest.mark.parametrize("ds,kind,neg_kind", [(ds, kind, k) for ds, kind in JUDGES for k in kinds_of(ds, kind)])
def test_every_kind_of_negative_is_rejected(ds, kind, neg_kind):
    x, y = _test_images(ds)
    neg = ng.make_negatives(x[:N_NEG], neg_kind, torch.Generator().manual_seed(5), y[:N_NEG])
    # on 200 negatives: 5 points of slack for the smaller sample (the manifest's figures are on 2,000)
    assert _rejected(_judge(ds, kind), neg) >= floor(ds, kind, neg_kind) - 0.05, (ds, kind, neg_kind)


@pytest.mark.parametrize("ds", ["mnist", "fashion_mnist"])
def test_the_manifest_ships_the_reject_figures_it_promises(ds):
    files = json.loads((ROOT / "checkpoints" / ds / "manifest.json").read_text())["files"]
    for kind in ("oracle", "evaluator"):
        rep = files[kind]["reject_report"]
        assert files[kind]["file"].endswith(f"{kind}_reject.pt")
        for name in ("real", "thinned", "thickened"):   # every class; the MNIST oracle: 1.33 % of real 0s
            assert rep[f"rejected_{name}"]["max"] <= (0.01 if kind == "evaluator" else 0.015), (ds, kind, name)
        assert set(kinds_of(ds, kind)) <= set(rep["rejected_negatives"])
        for neg_kind in kinds_of(ds, kind):
            share = rep["rejected_negatives"][neg_kind]
            assert share >= floor(ds, kind, neg_kind), (ds, kind, neg_kind, share)


@pytest.mark.parametrize("ds", ["mnist", "fashion_mnist"])
def test_real_images_stay_below_the_flat_negatives_ink(ds):
    x, _ = _test_images(ds)
    assert float(((x + 1) / 2).flatten(1).mean(1).max()) < ng.FLAT_MIN_INK


def test_class_stats_with_a_reject_class_by_hand():
    # 5 samples, decisions: 1, 4, reject, 2, 1 (preference [1, 4])
    dec = [1, 4, REJECT_CLASS, 2, 1]
    probs = torch.full((5, 11), 0.01)
    probs[torch.arange(5), torch.tensor(dec)] = 0.9
    probs[2, 4] = 0.5            # the rejected one's best class is 4: the argmax-only rate counts it
    s = class_stats(probs, [1, 4])
    assert s["rejected_rate"] == pytest.approx(0.2)
    assert s["legible_preferred_rate"] == pytest.approx(0.6)
    assert s["preferred_rate"] == pytest.approx(0.8)
    assert s["class_fraction"][1] == pytest.approx(0.4) and s["class_fraction"][4] == pytest.approx(0.2)
    assert s["min_liked_share"] == pytest.approx(0.2)
    assert s["preferred_fraction_within"] == pytest.approx([2 / 3, 1 / 3], abs=1e-4)
    assert "rejected_rate" not in class_stats(probs[:, :10], [1, 4])   # a 10-class judge has no such answer


class Decides(torch.nn.Module):
    """An 11-output oracle: the image whose pixels hold i decides class dec[i] (a reject-aware head)."""
    head_key = "head"

    def __init__(self, dec, second):
        super().__init__()
        self.head = torch.nn.Linear(1, 11)
        self.dec, self.second = torch.tensor(dec), torch.tensor(second)

    def forward(self, x):
        i = x[:, 0, 0, 0].long()
        logits = torch.zeros(len(i), 11)
        logits[torch.arange(len(i)), self.second[i]] = 2.0
        logits[torch.arange(len(i)), self.dec[i]] = 5.0
        return logits.log_softmax(1)


def _ask(src, n, kind="label"):
    m = n if kind == "label" else 2 * n
    imgs = torch.arange(m, dtype=torch.float32).view(m, 1, 1, 1).expand(m, 1, 2, 2)
    return src.ask(Query(1, kind, [str(i) for i in range(n)], imgs)).tolist()


def test_the_realistic_user_dislikes_what_it_rejects_and_the_argmax_user_does_not():
    # images 0..3 decide 1, reject, 7, reject; the rejected ones' next-best classes are 4 (liked) and 2
    oracle = Decides([1, REJECT_CLASS, 7, REJECT_CLASS], [0, 4, 0, 2])
    assert _ask(OracleFeedback(oracle, [1, 4, 7, 9], reject=True), 4) == [1, -1, 1, -1]
    assert _ask(OracleFeedback(oracle, [1, 4, 7, 9], reject=False), 4) == [1, 1, 1, -1]
    # pairs (0, 1) and (2, 3): the legible liked image wins against the rejected one
    assert _ask(OracleFeedback(oracle, [1, 4, 7, 9], reject=True), 2, kind="pair") == [1, 1]
    # rewards: the rejected mass counts against
    r = OracleFeedback(oracle, [1, 4, 7, 9], reject=True).ask(Query(1, "reward", ["0", "1"],
                                                                torch.arange(2.).view(2, 1, 1, 1).expand(2, 1, 2, 2)))
    assert r[0] > 0.9 and r[1] < 0.1


def test_a_reject_user_needs_a_reject_aware_oracle():
    ten = load_classifier("oracle", ROOT / "checkpoints" / "mnist" / "oracle.pt", "mnist")
    assert not has_reject(ten)
    with pytest.raises(ConfigError, match="feedback.reject"):
        OracleFeedback(ten, [1], reject=True)
