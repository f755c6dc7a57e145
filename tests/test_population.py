"""A population run (papa/population.py): every user aligns their own adapter, the summary names them all, a stopped
population resumes, and users sharded over 2 ranks get the numbers they get on 1."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("peft")

from papa.config import ConfigError, load_config  # noqa: E402
from test_train import args_for, overrides, tiny  # noqa: E402,F401 - tiny: the module fixture
from testutil import ROOT, assert_same_metrics, metrics  # noqa: E402

USERS = """dataset: mnist
users:
  - {id: fours, like: [4]}
  - {id: bold_low, like: [0, 1, 2], attribute: {name: stroke_width, above: 2.5}, flip_prob: 0.1}
  - {id: late, like: [7], new: true}
"""


def population(tmp_path):
    p = tmp_path / "users.yaml"
    p.write_text(USERS)
    return ["adapter.rank=2", "adapter.alpha=8", f"users.population={p}"]


def test_every_user_gets_a_run_and_the_summary_lists_them(tiny, tmp_path):
    from papa.train import main
    out = tmp_path / "one"
    assert main(args_for(overrides(tiny, out, rounds=1, extra=population(tmp_path)))) == 0
    rd = out / "mnist" / "run"
    assert sorted(p.name for p in (rd / "users").iterdir()) == ["bold_low", "fours"]     # `new` users left out
    for uid, like in (("fours", [4]), ("bold_low", [0, 1, 2])):
        cfg = load_config(rd / "users" / uid / "config.yaml")
        assert cfg.feedback.preference == like and cfg.users.population == "" and cfg.adapter.rank == 2
        assert [r["labels_used"] for r in metrics(rd / "users" / uid)] == [0, 4]
    assert load_config(rd / "users" / "bold_low" / "config.yaml").feedback.flip_prob == 0.1
    md = (rd / "population.md").read_text()
    assert "| fours | [4] | — |" in md and "| bold_low | [0, 1, 2] | stroke_width > 2.5 |" in md
    assert (rd / "population.png").is_file()
    summ = json.loads((rd / "population.json").read_text())
    assert set(summ["tastes"]) == {"bold_low"} and 0 <= summ["tastes"]["bold_low"]["user_taste_rate"] <= 1
    # a second start refuses; --overwrite does not apply; --resume finds every user done
    with pytest.raises(ConfigError, match="already holds a population run"):
        main(args_for(overrides(tiny, out, rounds=1, extra=population(tmp_path))))
    with pytest.raises(ConfigError, match="--overwrite does not apply"):
        main(args_for(overrides(tiny, out, rounds=1, extra=population(tmp_path)), "--overwrite"))
    assert main(["--resume", str(rd)]) == 0
    # an edited user is refused on resume, unless --force
    (tmp_path / "users.yaml").write_text(USERS.replace("like: [4]}", "like: [5]}"))
    with pytest.raises(ConfigError, match="user 'fours' of .* differs"):
        main(["--resume", str(rd)])
    (tmp_path / "users.yaml").write_text(USERS)
    # a user's model samples through papa.sample --user; an unknown user is one line naming the known ones
    from papa.sample import main as sample
    assert sample(["--config", str(rd / "config.yaml"), "--user", "fours", "--checkpoint", str(rd), "--num", "3",
                   "--out", str(tmp_path / "s"), "--quiet", "--set", "sample.batch_size=3"]) == 0
    with pytest.raises(ConfigError, match=r"the users there are \['bold_low', 'fours'\]"):
        sample(["--config", str(rd / "config.yaml"), "--user", "nobody", "--checkpoint", str(rd), "--num", "3",
                "--out", str(tmp_path / "t"), "--quiet"])
    with pytest.raises(ConfigError, match="names the population run's directory"):
        sample(["--config", str(rd / "config.yaml"), "--user", "fours", "--checkpoint", str(rd / "config.yaml"),
                "--num", "3", "--out", str(tmp_path / "t"), "--quiet"])


def test_a_stopped_population_resumes_to_the_same_numbers(tiny, tmp_path):
    from papa.train import main
    out = tmp_path / "cut"
    assert main(args_for(overrides(tiny, out, rounds=2, extra=population(tmp_path)))) == 0
    rd = out / "mnist" / "run"
    whole = metrics(rd / "users" / "bold_low")
    (rd / "users" / "bold_low" / "checkpoints" / "round_002.pt").unlink()    # stopped during the last user's round 2
    (rd / "users" / "bold_low" / "taste.json").unlink()
    assert main(["--resume", str(rd)]) == 0
    assert_same_metrics(whole, metrics(rd / "users" / "bold_low"))


def test_users_sharded_over_two_ranks_match_one(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    from papa.train import main
    assert main(args_for(overrides(tiny, one, rounds=1, extra=population(tmp_path)))) == 0
    r = subprocess.run([sys.executable, "-m", "papa.train", "--nproc-per-node", "2",
                        *args_for(overrides(tiny, two, rounds=1, extra=population(tmp_path)))],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    for uid in ("fours", "bold_low"):
        assert_same_metrics(metrics(one / "mnist" / "run" / "users" / uid), metrics(two / "mnist" / "run" / "users" / uid))


@pytest.mark.parametrize("extra,fragment", [
    (["adapter.rank=0"], "needs adapter.rank > 0"),
    (["data.dataset=fashion_mnist"], "is a mnist population"),
    (["users.only=[fours,nobody]"], "users.only': 'nobody' is not a user of"),
])
def test_population_config_errors_are_one_line(tmp_path, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(ROOT / "configs" / "mnist.yaml", population(tmp_path) + extra)


def test_users_only_runs_the_named_users_new_ones_included():
    from papa.population import users_of
    cfg = load_config(ROOT / "configs" / "mnist_users.yaml", ["users.only=[new_08,single_2]"])
    assert [u.id for u in users_of(cfg)[1]] == ["single_2", "new_08"]   # in the file's order
