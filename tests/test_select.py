"""Active querying (papa.select): each selector's choice on small hand-built pools, the preference model on a toy
problem, determinism given the seed, and a tiny run whose pool costs no labels and resumes exactly."""
import json
import math

import pytest
import torch

from papa.config import ConfigError, SelectConfig
from papa.select import SELECTORS, Pool, PreferenceModel, bald, choose, prediction_stats, pseudo_labels
from test_train import args_for, overrides, run_dir, tiny  # noqa: F401 - tiny: the module fixture
from testutil import assert_same_metrics, metrics


def pool(feats, probs=None, labelled=None, seed=0):
    f = torch.tensor(feats, dtype=torch.float32).reshape(len(feats), -1)
    return Pool(f, None if probs is None else torch.tensor(probs, dtype=torch.float32),
                torch.zeros(0, f.shape[1]) if labelled is None else torch.tensor(labelled, dtype=torch.float32),
                torch.Generator().manual_seed(seed))


def pick(name, p, k, **settings):
    return SELECTORS[name](SelectConfig(selector=name, **settings)).pick(p, k)


def test_registry_holds_every_selector():
    assert set(SELECTORS) == {"random", "exploit", "uncertainty", "diversity", "uncertainty_diversity",
                              "exploit_diversity", "thompson", "balanced"}


def test_exploit_picks_the_most_likely_liked():
    probs = [[0.1, 0.9, 0.5, 0.7], [0.3, 0.7, 0.6, 0.8]]            # means 0.2, 0.8, 0.55, 0.75
    assert pick("exploit", pool([0, 1, 2, 3], probs), 2) == [1, 3]


def test_uncertainty_picks_disagreement_not_mere_doubt():
    # candidate 0: both members unsure (0.5); candidate 1: they disagree (0.95 vs 0.05); candidate 2: both sure
    probs = [[0.5, 0.95, 0.99], [0.5, 0.05, 0.98]]
    assert pick("uncertainty", pool([0, 1, 2], probs), 1) == [1]
    b = bald(torch.tensor(probs))
    h95 = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))                 # by hand: ln 2 − H(0.95)
    assert b[0].abs() < 1e-6 and b[1] == pytest.approx(math.log(2) - h95, abs=1e-5) and b[2] < 0.01


def test_diversity_is_k_center_away_from_what_was_asked():
    # labelled at 0; candidates near it, at 5 and 5.1, and at 10: the farthest first, then the farthest from both
    p = pool([[0.3], [5.0], [10.0], [5.1]], labelled=[[0.0]])
    assert pick("diversity", p, 2) == [2, 1]
    assert pick("diversity", p, 3) == [2, 1, 0]           # 0.3 from the labelled point, 5.1 only 0.1 from 5


def test_uncertainty_diversity_prefers_the_uncertain_one_far_from_the_labels():
    probs = [[0.9, 0.9, 0.5], [0.1, 0.1, 0.5]]  # 0 and 1 equally uncertain; 2 not at all
    p = pool([[0.2], [8.0], [9.0]], probs, labelled=[[0.0]])
    assert pick("uncertainty_diversity", p, 1) == [1]
    assert pick("uncertainty_diversity", p, 1, diversity_weight=0.0) in ([0], [1])


def test_exploit_diversity_spreads_the_likes_over_the_liked_clusters():
    # a big liked cluster near 0 (the class taking over), a smaller liked one near 10, disliked ones near 5
    feats = [[0.0], [0.1], [0.2], [0.3], [10.0], [10.1], [5.0], [5.1]]
    probs = [[0.95, 0.94, 0.93, 0.92, 0.85, 0.84, 0.05, 0.04]]
    p = pool(feats, probs, labelled=[[10.0]])            # earlier rounds' images are not counted as picked
    assert pick("exploit", p, 2) == [0, 1]               # exploit: the surest two, both of the big cluster
    assert pick("exploit_diversity", p, 2) == [0, 4]     # one like from each liked cluster
    assert pick("exploit_diversity", p, 3)[2] == 6       # both covered: the far, unlikely one (a dislike) next
    assert pick("exploit_diversity", p, 3, diversity_weight=0.0) == [0, 1, 2]   # weight 0: exploit


def test_thompson_takes_each_drawn_members_favourite():
    one = [[0.2, 0.9, 0.4, 0.8]]  # a single member: Thompson is exploitation
    assert pick("thompson", pool([0, 1, 2, 3], one), 3) == [1, 3, 2]
    two = [[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]]  # every pick is one member's top among the rest
    got = pick("thompson", pool([0, 1, 2], two, seed=3), 2)
    assert sorted(got) == [0, 1]


def test_balanced_asks_about_likely_likes_only_while_they_are_rare():
    # 20 candidates; the model calls 2 of them liked (indices 3 and 11): share 0.1 < 0.5, so
    # n = ceil(10 * 0.4 / 0.9) = 5 picks are Thompson's (both likely likes among them), the other 5 random
    rare = [[0.95 if i in (3, 11) else 0.3 - 0.01 * i for i in range(20)]]
    # (no answers passed: the share is the model's)
    sel = SELECTORS["balanced"](SelectConfig(selector="balanced", like_share=0.5))
    got = sel.pick(pool(list(range(20)), rare), 10)
    assert got[:2] == [3, 11] and len(set(got)) == 10
    assert got[2:5] == [0, 1, 2]                       # the rest of the Thompson picks: the next most likely
    assert sel.info == {"like_share": 0.1, "trusted": True, "model_picks": 5}
    # likes common (12 of 20 called liked): every pick random, the same as the random selector's
    common = [[0.9 if i < 12 else 0.1 for i in range(20)]]
    sel = SELECTORS["balanced"](SelectConfig(selector="balanced", like_share=0.5))
    got = sel.pick(pool(list(range(20)), common, seed=4), 10)
    assert sel.info["model_picks"] == 0
    assert got == pick("random", pool(list(range(20)), seed=4), 10)
    # like_share 1: every pick Thompson's, which is exploitation with one member
    assert pick("balanced", pool(list(range(20)), rare), 4, like_share=1.0) == [3, 11, 0, 1]


def test_balanced_counts_likes_among_the_answered_random_picks_and_stops_trusting_a_wrong_model():
    rare = [[0.95 if i in (3, 11) else 0.3 - 0.01 * i for i in range(20)]]   # the model calls 10 % liked
    def balanced(y, model, rounds, **settings):
        p = pool(list(range(20)), rare)
        p.answers, p.model_picked, p.asked_round = (torch.tensor(y, dtype=torch.float32), torch.tensor(model),
                                                    torch.tensor(rounds))
        sel = SELECTORS["balanced"](SelectConfig(selector="balanced", **settings))
        return sel.pick(p, 10), sel.info
    # random picks answered: 4 likes, 4 dislikes and 2 skipped: a share of 0.5 -> no model picks; the model's
    # own picks (all liked) do not count
    y, model = [1, 1, 1, 1, -1, -1, -1, -1, 0, 0, 1, 1], [False] * 10 + [True] * 2
    assert balanced(y, model, [1] * 10 + [2] * 2)[1] == {"like_share": 0.5, "trusted": True, "model_picks": 0}
    # 1 like in 5 answered random picks: 0.2 -> ceil(10 * 0.3 / 0.8) = 4 model picks; the model's opinion (0.1)
    # is not used; "model" uses it: 5
    y, model = [1, -1, -1, -1, -1], [False] * 5
    assert balanced(y, model, [1] * 5)[1]["model_picks"] == 4
    assert balanced(y, model, [1] * 5, like_share_from="model")[1]["model_picks"] == 5
    # the last round's model picks were all disliked: this round is random picks only (unless the gate is off);
    # an earlier round's failures do not count
    y, model, rounds = [1, -1, -1, -1, -1, -1, -1], [False] * 5 + [True] * 2, [1] * 5 + [2] * 2
    got, info = balanced(y, model, rounds)
    assert info == {"like_share": 0.2, "trusted": False, "model_picks": 0}
    assert balanced(y, model, rounds, model_min_precision=0.0)[1]["model_picks"] == 4
    assert balanced(y, model, [1] * 7)[1]["trusted"] is False          # all in one round: still the last
    assert balanced(y + [1], model + [False], rounds + [3])[1]["trusted"] is True      # round 3 had no model picks


def test_random_is_distinct_and_seeded():
    p = lambda s: pool(list(range(20)), seed=s)
    a = pick("random", p(0), 10)
    assert len(set(a)) == 10 and a == pick("random", p(0), 10) and a != pick("random", p(1), 10)


def test_preference_model_fits_a_toy_problem_and_waits_for_both_kinds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = torch.where(x[:, 0] + 0.5 * x[:, 1] > 0, 1.0, -1.0)
    m = PreferenceModel.fit(x[:100], y[:100], members=4, l2=0.1, seed=0)
    p = m.probs(x[100:])
    assert p.shape == (4, 100)
    assert ((p.mean(0) > 0.5) == (y[100:] > 0)).float().mean() > 0.9
    assert not torch.allclose(p[0], p[1])                         # bootstrap members disagree somewhere
    assert PreferenceModel.fit(x[:10], torch.ones(10), 3, 0.1, 0) is None           # likes only: not fitted
    skipped = y[:100].clone()
    skipped[50:] = 0                                                                # skips are left out
    a = PreferenceModel.fit(x[:100], skipped, 1, 0.1, 0)
    b = PreferenceModel.fit(x[:50], y[:50], 1, 0.1, 0)
    assert torch.allclose(a.w, b.w, atol=1e-5)


def test_choose_is_deterministic_and_falls_back_before_the_model():
    g = torch.Generator().manual_seed(1)
    feats, lab = torch.randn(32, 6, generator=g), torch.randn(12, 6, generator=g)
    y = torch.tensor([1.0, -1.0] * 6)
    for name in SELECTORS:
        s = SelectConfig(selector=name, ensemble=3)
        a, rec = choose(s, feats, lab, y, 5, seed=7)
        assert a == choose(s, feats, lab, y, 5, seed=7)[0] and len(set(a)) == 5, name
        assert rec["fallback"] is None and len(rec["p_like"]) == 5
        _, rec0 = choose(s, feats, lab[:0], y[:0], 5, seed=7)                # nothing labelled yet
        assert rec0["fallback"] == ("random" if SELECTORS[name].needs_model else None)
    assert prediction_stats([0.9, 0.2, 0.6], torch.tensor([1.0, -1.0, 0.0])) == {"pref_acc": 1.0, "pref_brier": 0.025}
    assert prediction_stats(None, torch.tensor([1.0])) == {}


@pytest.mark.parametrize("selector", ["exploit", "balanced"])
def test_pool_rounds_count_only_the_asked_and_resume_exactly(tiny, tmp_path, selector):
    # balanced: its choice depends on which earlier images were the model's picks, kept in the checkpoint
    from papa.train import main
    extra = [f"select.selector={selector}", "select.pool_size=8", "select.ensemble=2", "select.like_share=0.9"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(args_for(overrides(tiny, whole, rounds=3, extra=extra))) == 0
    rows = metrics(run_dir(whole))
    assert [r["labels_used"] for r in rows] == [0, 4, 8, 12]          # 4 asked of 8 drawn, per round
    assert rows[1]["select_fallback"] == 1 and rows[3]["select_fallback"] == 0 and 0 <= rows[3]["pref_acc"] <= 1
    rec = json.loads((run_dir(whole) / "rounds" / "001" / "pool.json").read_text())
    assert rec["pool_size"] == 8 and rec["pool_seconds"] > 0 and len(rec["chosen"]) == 4 and (run_dir(whole) / "rounds" / "001" / "pool.png").is_file()
    labels = json.loads((run_dir(whole) / "rounds" / "002" / "labels.json").read_text())
    assert len(labels) == 4
    # the asked images are the pool's chosen candidates: candidate i of the pool is image i of a pool-less round
    plain = tmp_path / "plain"
    assert main(args_for(overrides(tiny, plain, rounds=1, extra=["train.samples_per_round=8", "train.batch_size=8"]))) == 0
    drawn = torch.load(run_dir(plain) / "rounds" / "001" / "images.pt")
    asked = torch.load(run_dir(whole) / "rounds" / "001" / "images.pt")
    assert torch.equal(asked, drawn[rec["chosen"]])
    # cut after round 2 and resumed: the same choices and metrics as the whole run
    assert main(args_for(overrides(tiny, cut, rounds=3, extra=extra))) == 0
    (run_dir(cut) / "checkpoints" / "round_003.pt").unlink()
    assert main(["--resume", str(run_dir(cut))]) == 0
    assert_same_metrics(rows, metrics(run_dir(cut)))
    a, b = (json.loads((run_dir(d) / "rounds" / "003" / "pool.json").read_text()) for d in (whole, cut))
    assert a["chosen"] == b["chosen"] and a["p_like"] == b["p_like"] and a["fallback"] is None
    assert a["round"] == 3 and a["model_picks"] == b["model_picks"] and (selector == "balanced") == ("trusted" in a)


def test_pseudo_labels_take_the_surest_unasked_candidates():
    # one feature decides the taste: likes at +3, dislikes at -3; the pool holds sure likes, sure dislikes, doubtful ones
    lab = torch.tensor([[3.0], [2.5], [3.5], [-3.0], [-2.5], [-3.5]])
    y = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    feats = torch.tensor([[4.0], [0.0], [-4.0], [0.1], [3.0], [-3.0], [5.0]])
    s = SelectConfig(selector="random", ensemble=3, l2=0.01, pseudo_labels=3, pseudo_confidence=0.9)
    idx, labels, p = pseudo_labels(s, feats, asked=[6], labelled=lab, y=y, seed=0)
    assert len(idx) == 3 and 6 not in idx and 1 not in idx and 3 not in idx          # never asked, never doubtful
    assert set(idx) <= {0, 2, 4, 5} and all(min(v, 1 - v) <= 0.1 for v in p)
    assert all((lv > 0) == (feats[i, 0] > 0) for i, lv in zip(idx, labels.tolist()))   # likes on the liked side
    again = pseudo_labels(s, feats, [6], lab, y, seed=0)
    assert again[0] == idx and torch.equal(again[1], labels)                          # deterministic
    # every sure candidate when the cap allows, the surest first
    idx4, _, p4 = pseudo_labels(SelectConfig(selector="random", ensemble=3, l2=0.01, pseudo_labels=10), feats, [6], lab, y, 0)
    assert sorted(idx4) == [0, 2, 4, 5] and [abs(v - 0.5) for v in p4] == sorted((abs(v - 0.5) for v in p4), reverse=True)
    # nothing before the model can be fitted (no dislike yet)
    assert pseudo_labels(s, feats, [6], lab[:3], y[:3], seed=0)[0] == []


def test_pseudo_label_rounds_count_only_the_persons_labels_and_resume_exactly(tiny, tmp_path):
    # with the base ratio on the pool's candidates too: both deterministic, both resumed exactly
    from papa.train import main
    extra = ["select.selector=random", "select.pool_size=8", "select.ensemble=2", "select.pseudo_labels=3",
             "select.pseudo_confidence=0.6", "papa.replay=true", "papa.replay_size=2",
             "papa.base_ratio=1", "papa.base_ratio_num=6", "papa.base_ratio_rounds=2"]   # and the base ratio
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(args_for(overrides(tiny, whole, rounds=3, extra=extra))) == 0
    rows = metrics(run_dir(whole))
    assert [r["labels_used"] for r in rows] == [0, 4, 8, 12]          # pseudo-labels cost nothing
    added = [r.get("pseudo_positive", 0) + r.get("pseudo_negative", 0) for r in rows[1:]]
    assert all(0 <= a <= 3 for a in added) and sum(added) > 0
    for r, a in zip((1, 2, 3), added):
        rec = json.loads((run_dir(whole) / "rounds" / f"{r:03d}" / "pool.json").read_text())
        assert len(rec["pseudo"]) == a and not set(rec["pseudo"]) & set(rec["chosen"])
        assert len(json.loads((run_dir(whole) / "rounds" / f"{r:03d}" / "labels.json").read_text())) == 4
    assert main(args_for(overrides(tiny, cut, rounds=3, extra=extra))) == 0
    (run_dir(cut) / "checkpoints" / "round_003.pt").unlink()
    assert main(["--resume", str(run_dir(cut))]) == 0
    assert_same_metrics(rows, metrics(run_dir(cut)))


@pytest.mark.parametrize("extra, key", [
    (["select.pseudo_labels=5"], "select.pseudo_labels"),                              # no pool to label
    (["select.selector=random", "select.pseudo_labels=5", "select.pool_size=10"], "select.pool_size"),
    (["select.pseudo_confidence=0.4"], "select.pseudo_confidence"),
    (["select.pseudo_weight=0"], "select.pseudo_weight"),
    (["select.selector=bogus"], "select.selector"),
    (["select.selector=random", "train.algo=d3po"], "select.selector"),
    (["select.selector=random", "select.pool_size=2"], "select.pool_size"),
    (["select.ensemble=0"], "select.ensemble"),
    (["select.like_share=0"], "select.like_share"),
    (["select.like_share=1.5"], "select.like_share"),
    (["select.like_share_from=pool"], "select.like_share_from"),
    (["select.model_min_precision=2"], "select.model_min_precision"),
])
def test_bad_select_settings_are_one_line_errors(extra, key):
    from papa.config import load_config
    from testutil import ROOT
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs" / "mnist.yaml", extra)


def test_compare_counts_the_labels_to_the_target():
    from papa.compare import labels_to
    curve = [(0, 0.4), (50, 0.8), (100, 0.95), (150, 0.85)]
    assert labels_to(curve, 0.9) == pytest.approx(50 + 50 * 0.1 / 0.15)   # by hand: between 50 and 100 labels
    assert labels_to(curve, 0.3) == 0.0 and math.isnan(labels_to(curve, 0.99))


def test_the_selector_comparison_config_plans_every_selector_on_one_budget(tmp_path):
    from papa.compare import load_compare, plan
    from testutil import ROOT
    spec = load_compare(ROOT / "configs" / "compare_selectors_mnist.yaml")
    runs = plan(spec)
    chosen = {m: c.select.selector for m, s, c, _ in runs if s == 0}
    assert chosen == {"no_pool": "none", **{name: name for name in SELECTORS}, "random_pseudo": "random"}
    assert spec["target"] == 0.9 and {m: c.select.pseudo_labels for m, s, c, _ in runs if s == 0}["random_pseudo"] == 30
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "compare_selectors_mnist.yaml").read_text().replace("target: 0.9", "target: 2"))
    with pytest.raises(ConfigError, match="'target'"):
        load_compare(bad)
