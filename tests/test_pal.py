"""PAL on images (papa.pal) against a plain-torch reference written from its formula, its few-shot step, and the
population of simulated users (papa.users): the file's checks, the fine-grained measurements, a user's answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from papa.config import REPO_ROOT, ConfigError
from papa.pal import PAL, balanced_weights, fit, fit_user, like_loss, pair_loss
from papa.users import NUM_CLASSES, SimulatedUser, load_population, slant
from papa.fidelity import stroke_width


# --------------------------------------------------------------------------- the reference, one example at a time

def ref_reward(m: PAL, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """r_u(x) = min(exp(σ), 100) · cos(P ẑ + c, Σ_k softmax(W_u)_k g_k), for one image's features z and user logits."""
    z, logits = z.double(), logits.double()
    zh = (z - m.mean.double()) / m.std.double()
    f = m.proj.weight.double() @ zh + m.proj.bias.double()
    w = torch.exp(logits) / torch.exp(logits).sum()
    u = sum(w[k] * m.prototypes[k].double() for k in range(len(w)))
    cos = (f @ u) / (f.norm() * u.norm())
    return min(math.exp(m.log_scale.item()), 100.0) * cos


def ref_reward_a(m: PAL, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """PAL-A: r_u(x) = −min(exp(σ), 100) · ‖(P ẑ + c) − (P Σ_k softmax(W_u)_k p_k + c)‖."""
    z, logits = z.double(), logits.double()
    P, c = m.proj.weight.double(), m.proj.bias.double()
    f = P @ ((z - m.mean.double()) / m.std.double()) + c
    w = torch.exp(logits) / torch.exp(logits).sum()
    a = P @ sum(w[k] * m.prototypes[k].double() for k in range(len(w))) + c
    return -min(math.exp(m.log_scale.item()), 100.0) * (f - a).norm()


def test_pal_a_reward_and_few_shot_fit_follow_the_ideal_point_formula():
    m = PAL(5, 3, k=3, d=4, seed=4, variant="A")
    feats = torch.randn(12, 5, generator=torch.Generator().manual_seed(5))
    m.set_standardisation(feats)
    with torch.no_grad():
        m.W.normal_(generator=torch.Generator().manual_seed(6))
        m.log_scale.fill_(0.4)
    users = torch.arange(12) % 3
    got = m.reward(feats, users)
    want = torch.stack([ref_reward_a(m, feats[i], m.W[users[i]]) for i in range(12)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got <= 0).all() and m.prototypes.shape == (3, 5)   # prototypes in feature space, reward a distance
    # a newcomer who likes the images nearest prototype 0: fit_user puts their weight there
    with torch.no_grad():
        d0 = (m.embed(feats) - m.ideal_points(torch.eye(3) * 50)[0]).norm(dim=1)
    y = torch.where(d0 <= d0.median(), 1.0, -1.0)
    w = fit_user(m, feats, y)
    assert w.softmax(0).argmax() == 0
    with pytest.raises(ValueError, match="variant must be 'A'"):
        PAL(5, 3, variant="C")


def toy_model(seed=0, users=3, k=3, d_in=5):
    m = PAL(d_in, users, k=k, d=4, seed=seed)
    feats = torch.randn(12, d_in, generator=torch.Generator().manual_seed(seed + 1))
    m.set_standardisation(feats)
    with torch.no_grad():
        m.offset.fill_(0.3)
        m.W.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return m, feats


def test_like_loss_matches_the_formula():
    m, feats = toy_model()
    users = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    y = torch.tensor([1, -1, 1, 1, -1, -1, -1, 1, 0, -1, 0, -1.])
    # by hand: per user, likes and dislikes each half of that user's weight; skips (0) left out; users equal
    total = torch.zeros((), dtype=torch.float64)
    for u in range(3):
        for side in (1, -1):
            rows = [i for i in range(len(y)) if users[i] == u and y[i] == side]
            for i in rows:
                r = ref_reward(m, feats[i], m.W[u]) + m.offset.item()
                total += -F.logsigmoid(side * r).item() / len(rows) / 2 / 3
    assert like_loss(m, feats, users, y).item() == pytest.approx(float(total), rel=1e-5)


def test_pair_loss_matches_bradley_terry():
    m, feats = toy_model(seed=3)
    users = torch.tensor([0, 1, 1, 2, 2])
    first, second = feats[:5], feats[5:10]
    y = torch.tensor([1, -1, 1, 0, 1.])
    total = 0.0
    per_user = {0: 1, 1: 2, 2: 1}                       # the tie (0) is left out
    for i in range(5):
        if y[i] == 0:
            continue
        u = int(users[i])
        margin = ref_reward(m, first[i], m.W[u]) - ref_reward(m, second[i], m.W[u])
        total += -F.logsigmoid(y[i] * margin).item() / per_user[u] / 3
    assert pair_loss(m, first, second, users, y).item() == pytest.approx(total, rel=1e-5)


def test_balanced_weights_give_each_user_and_side_its_share():
    users = torch.tensor([0, 0, 0, 0, 1, 1])
    y = torch.tensor([1, -1, -1, -1, -1, -1.])
    w = balanced_weights(users, y)
    assert w.tolist() == pytest.approx([0.25, 0.25 / 3, 0.25 / 3, 0.25 / 3, 0.25, 0.25])


def test_few_shot_loss_and_gradient_match_the_reference_and_touch_only_the_new_users_logits():
    m, feats = toy_model(seed=5)
    y = torch.tensor([1, -1, 1, -1, 1.])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    wr = w.detach().clone().requires_grad_(True)
    # the reference: 3 likes and 2 dislikes, each side half the weight
    ref = sum(-F.logsigmoid(y[i] * (ref_reward(m, feats[i], wr) + m.offset.item())) / (3 if y[i] > 0 else 2) / 2
              for i in range(5))
    (g_ref,) = torch.autograd.grad(ref, wr)
    got = like_loss(m, feats[:5], torch.zeros(5, dtype=torch.long), y, logits=w[None])
    (g,) = torch.autograd.grad(got, w)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g.double(), g_ref.double(), rtol=1e-4, atol=1e-6)
    # one Adam step from zero logits is −lr · g / (|g| + ε) per component; nothing shared moves
    w0 = torch.zeros(m.k, requires_grad=True)
    ref0 = sum(-F.logsigmoid(y[i] * (ref_reward(m, feats[i], w0) + m.offset.item())) / (3 if y[i] > 0 else 2) / 2
               for i in range(5))
    (g0,) = torch.autograd.grad(ref0, w0)
    step = fit_user(m, feats[:5], y, steps=1, lr=0.1, prior=0.0)
    assert torch.allclose(step, -0.1 * g0 / (g0.abs() + 1e-8), atol=1e-5)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed while fitting a new user"
    assert all(p.requires_grad for p in m.parameters())


def two_tastes(n=200, seed=0):
    """Two users who disagree: user 0 likes feature 0 > 0, user 1 likes feature 0 < 0; feature 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 3, generator=g)
    users = torch.arange(n) % 2
    like = (feats[:, 0] > 0) == (users == 0)
    return feats, users, torch.where(like, 1.0, -1.0)


def test_pal_fits_users_who_disagree_where_one_shared_model_cannot():
    feats, users, y = two_tastes()
    pal, shared = PAL(3, 2, k=2, d=4, seed=0), PAL(3, 1, k=1, d=4, seed=0)
    fit(pal, feats, users, y, steps=300, lr=0.05)
    fit(shared, feats, torch.zeros_like(users), y, steps=300, lr=0.05)
    test, tu, ty = two_tastes(seed=1)
    with torch.no_grad():
        acc = ((pal.p_like(test, tu) > 0.5) == (ty > 0)).float().mean()
        acc_shared = ((shared.p_like(test, torch.zeros_like(tu)) > 0.5) == (ty > 0)).float().mean()
    assert acc > 0.9 and acc_shared < 0.65, (acc, acc_shared)
    # a newcomer with user 1's taste, from 6 labels: the fitted mixture leans on user 1's side
    w = fit_user(pal, test[tu == 1][:6], ty[tu == 1][:6])
    with torch.no_grad():
        p = pal.p_like(test[tu == 1], torch.zeros(int((tu == 1).sum()), dtype=torch.long), logits=w[None])
    assert ((p > 0.5) == (ty[tu == 1] > 0)).float().mean() > 0.85


def test_pal_is_deterministic_and_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a, b = PAL(6, 3, k=2, seed=11), PAL(6, 3, k=2, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.prototypes, PAL(6, 3, k=2, seed=12).prototypes)


def test_fit_user_without_answers_is_the_uniform_mixture():
    m, feats = toy_model()
    assert torch.equal(fit_user(m, feats[:3], torch.zeros(3)), torch.zeros(m.k))


# --------------------------------------------------------------------------- the population and its users

def test_shipped_populations_load():
    for ds in ("mnist", "fashion_mnist"):
        pop = load_population(REPO_ROOT / "configs" / f"users_{ds}.yaml")
        assert pop.dataset == ds and len(pop.seen) >= 16 and len(pop.new) >= 4
        assert any(u.attribute is not None for u in pop.seen)


@pytest.mark.parametrize("body,fragment", [
    ("users: [{id: a, like: [1]}]", "dataset"),
    ("dataset: mnist\nusers: [{id: a, like: [1], colour: red}]", "unknown key(s) ['colour']"),
    ("dataset: mnist\nusers: [{id: a, like: [10]}]", "user 'a'.like"),
    ("dataset: mnist\nusers: [{id: a, like: [1]}, {id: a, like: [2]}]", "['a'] appear more than once"),
    ("dataset: mnist\nusers: [{id: 'a b', like: [1]}]", "users[0].id"),
    ("dataset: mnist\nusers: [{id: a, like: [1], flip_prob: 0.7}]", "user 'a'.flip_prob"),
    ("dataset: mnist\nusers: [{id: a, like: [1], attribute: {name: slant, above: 1, below: 0}}]", "exactly one"),
    ("dataset: mnist\nusers: [{id: a, like: [1], attribute: {name: colour, above: 1}}]", "attribute.name"),
    ("dataset: mnist\nusers: [", "not valid YAML"),
])
def test_population_errors_name_the_user_and_key(tmp_path, body, fragment):
    p = tmp_path / "users.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_population(p)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def bar(width: int, lean: int = 0) -> torch.Tensor:
    """A 28×28 image in [−1, 1]: a vertical stroke `width` pixels wide, 20 rows tall, shifted `lean` pixels right per
    10 rows up."""
    img = -torch.ones(1, 28, 28)
    for r in range(4, 24):
        c = 12 + round(lean * (23 - r) / 10)
        img[0, r, c:c + width] = 1
    return img


def test_slant_and_stroke_width_read_the_drawing():
    imgs = torch.stack([bar(3), bar(3, lean=3), bar(3, lean=-3), bar(5)])
    s = slant(imgs)
    assert abs(s[0]) < 1e-9 and s[1] == pytest.approx(0.3, abs=0.03) and s[2] == pytest.approx(-0.3, abs=0.03)
    w = stroke_width(imgs)
    assert w[0] == pytest.approx(3, abs=0.3) and w[3] == pytest.approx(5, abs=0.8)


class OneClassOracle(torch.nn.Module):
    """A reject-aware oracle (11 outputs) that calls every image class 1 with probability `conf`."""
    head_key = "head"

    def __init__(self, conf=0.95):
        super().__init__()
        self.head = torch.nn.Linear(1, NUM_CLASSES + 1)
        self.conf = conf

    def forward(self, x):
        p = torch.full((len(x), NUM_CLASSES + 1), (1 - self.conf) / NUM_CLASSES)
        p[:, 1] = self.conf
        return p.log()


def test_a_user_with_a_taste_for_bold_strokes(tmp_path):
    p = tmp_path / "u.yaml"
    p.write_text("dataset: mnist\nusers:\n"
                 "  - {id: bold, like: [1, 7], attribute: {name: stroke_width, above: 3.5, margin: 0.4}}\n"
                 "  - {id: sevens, like: [7]}\n")
    bold, sevens = load_population(p).users
    imgs = torch.stack([bar(2), bar(4), bar(6)])       # stroke widths about 2, 3.7, 5.4
    user = SimulatedUser(OneClassOracle(), bold)
    assert user.likes(imgs).tolist() == [False, True, True]
    assert user.answers(imgs).tolist() == [-1, 0, 1]      # 3.7 is within 0.4 of the threshold: unsure, skipped
    assert SimulatedUser(OneClassOracle(), sevens).answers(imgs).tolist() == [-1, -1, -1]
