"""The measurements behind docs/SAMPLING.md that are not benchmarks: the UNet's profile, its speed-up variants, and
how far bf16 samples are from float32 ones.

    .venv/bin/python scripts/sampling_probe.py profile                  # where a forward's time goes (torch.profiler)
    .venv/bin/python scripts/sampling_probe.py variants [NAME ...]      # eager vs channels_last / jit / compile / bf16
    .venv/bin/python scripts/sampling_probe.py agree A/samples.pt B/samples.pt   # same evaluator class, pixel diff

All on the default MNIST config's base model, 100 images at t = 500, one thread. Each variant runs in its own
process (inductor's settings are global) and is timed as the minimum of 5 calls after one warm-up. A guide, not a
gate: the same-run ratios that are gated live in bench/bench_sampling.py.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("channels_last", "jit_freeze", "compile", "compile_freezing", "bf16", "bf16_compile_freezing")


def _setup():
    sys.path.insert(0, str(ROOT))
    from papa.config import load_config
    from papa.models import load_unet
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    net = load_unet(cfg.model, ROOT / cfg.checkpoints.base).eval()
    return net, torch.randn(100, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.full((100,), 500)


def _best(fn, n=5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _variant(name: str, net, x, t):
    """A callable computing ε̂ for the variant (compilation deferred to its first call)."""
    import torch._inductor.config as inductor
    from papa.sampling import autocast_bf16
    inductor.freezing = name.endswith("freezing")
    if name == "channels_last":
        n2, xc = copy.deepcopy(net).to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        return lambda: n2(xc, t)
    if name == "jit_freeze":
        with torch.inference_mode(False), torch.no_grad():
            n2 = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(net, (x, t)).eval()))
        return lambda: n2(x, t)
    if name in ("compile", "compile_freezing"):
        n2 = torch.compile(net)
        return lambda: n2(x, t)
    if name == "bf16":
        n2 = autocast_bf16(net, "cpu")
        return lambda: n2(x, t)
    n2 = torch.compile(autocast_bf16(net, "cpu"))  # bf16_compile_freezing
    return lambda: n2(x, t)


def one_variant(name: str) -> None:
    net, x, t = _setup()
    with torch.inference_mode():
        ref = net(x, t)
        t_eager = _best(lambda: net(x, t))
        fn = _variant(name, net, x, t)
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        t_var = _best(fn)
    print(f"{name:24s} eager {t_eager:.3f} s  variant {t_var:.3f} s  {t_eager / t_var:.2f}x  first call {first:.1f} s  "
          f"max abs diff {(out.float() - ref).abs().max():.1e}", flush=True)


def profile() -> None:
    from torch.profiler import profile as prof
    net, x, t = _setup()
    with torch.inference_mode():
        net(x, t)
        with prof() as p:
            net(x, t)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def agree(a: str, b: str) -> None:
    sys.path.insert(0, str(ROOT))
    from papa.config import load_config
    from papa.evaluate import classify
    from papa.models import load_classifier
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    ev = load_classifier("evaluator", ROOT / cfg.checkpoints.evaluator)
    xa, xb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    pa, pb = classify(ev, xa)[0].argmax(1), classify(ev, xb)[0].argmax(1)
    print(f"{len(xa)} images: same evaluator class {float((pa == pb).float().mean()):.3f}, "
          f"mean abs pixel difference {float((xa - xb).abs().mean()):.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["profile", "variants", "agree", "_one"])
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    if a.what == "profile":
        profile()
    elif a.what == "agree":
        if len(a.args) != 2:
            ap.error("agree takes two samples.pt files (from python -m papa.sample --out DIR)")
        agree(*a.args)
    elif a.what == "_one":
        one_variant(a.args[0])
    else:
        for name in a.args or VARIANTS:
            if name not in VARIANTS:
                ap.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
            subprocess.run([sys.executable, __file__, "_one", name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
