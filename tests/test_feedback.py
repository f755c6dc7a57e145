"""The simulated user's label noise and "unsure -> skip": flip rate, determinism given the seed and round, skips."""
import pytest
import torch

from papa.feedback import OracleFeedback
from papa.rounds import Query


class FixedOracle(torch.nn.Module):
    """Logits chosen per image: the image whose pixels hold i is class i % 10 with top probability `conf[i]` (the rest
    spread evenly)."""

    def __init__(self, conf):
        super().__init__()
        self.conf = torch.as_tensor(conf, dtype=torch.float64)

    def forward(self, x):
        i = x[:, 0, 0, 0].long()
        p = ((1 - self.conf[i]) / 9).view(-1, 1).expand(len(i), 10).clone()
        p[torch.arange(len(i)), i % 10] = self.conf[i]
        return p.log().float()


def ask(src, n, r=1, kind="label"):
    m = n if kind == "label" else 2 * n
    imgs = torch.arange(m, dtype=torch.float32).view(m, 1, 1, 1).expand(m, 1, 2, 2)
    return src.ask(Query(r, kind, [str(i) for i in range(n)], imgs))


def test_no_noise_answers_as_the_argmax_user():
    src = OracleFeedback(FixedOracle([0.9] * 10), [1, 4, 7, 9])
    assert ask(src, 10).tolist() == [-1, 1, -1, -1, 1, -1, -1, 1, -1, 1]


def test_flip_rate_and_determinism():
    n = 20_000
    clean = ask(OracleFeedback(FixedOracle([0.9] * n), [1, 4, 7, 9]), n)
    noisy = OracleFeedback(FixedOracle([0.9] * n), [1, 4, 7, 9], flip_prob=0.1, seed=3)
    a, b = ask(noisy, n, r=5), ask(noisy, n, r=5)
    rate = float((a != clean).double().mean())
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5, rate  # within 4 standard errors
    assert torch.equal(a, b)                                    # same seed and round: the same answers
    assert not torch.equal(a, ask(noisy, n, r=6))               # another round: other flips
    other = OracleFeedback(FixedOracle([0.9] * n), [1, 4, 7, 9], flip_prob=0.1, seed=4)
    assert not torch.equal(a, ask(other, n, r=5))               # another seed: other flips


def test_unsure_images_are_skipped_and_pairs_with_one_are_ties():
    conf = [0.95, 0.3, 0.95, 0.95, 0.4, 0.95, 0.95, 0.95, 0.95, 0.95]
    src = OracleFeedback(FixedOracle(conf), [1, 4, 7, 9], skip_below=0.5)
    assert ask(src, 10).tolist() == [-1, 0, -1, -1, 0, -1, -1, 1, -1, 1]   # 1 and 4 unsure: skipped
    # pairs (0, 1), (2, 3), (4, 5), (6, 7), (8, 9): the first and third hold an unsure image
    assert ask(src, 5, kind="pair").tolist() == [0, 0, 0, -1, -1]
    flipped = OracleFeedback(FixedOracle(conf), [1, 4, 7, 9], skip_below=0.5, flip_prob=0.5, seed=0)
    assert all(ask(flipped, 10, r=r)[[1, 4]].tolist() == [0, 0] for r in range(5))  # a skip is never flipped


def test_one_oracle_pass_per_image_answers_likes_and_skips():
    oracle = FixedOracle([0.95, 0.3] * 5)
    seen = []
    oracle.register_forward_hook(lambda m, inp, out: seen.append(len(inp[0])))
    src = OracleFeedback(oracle, [1, 4, 7, 9], skip_below=0.5, flip_prob=0.1, seed=1)
    ask(src, 10)
    assert seen == [10]                     # a label query: every image once
    seen.clear()
    ask(src, 5, kind="pair")
    assert seen == [5, 5]                   # a pair query: each side once


@pytest.mark.parametrize("bad", ["feedback.flip_prob=0.7", "feedback.flip_prob=-0.1", "feedback.skip_below=1"])
def test_noise_settings_are_validated(bad):
    from papa.config import ConfigError, load_config
    from testutil import ROOT
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(ROOT / "configs" / "mnist.yaml", [bad])
