"""PAPA update: papa's chunked, accumulated work list against the reference's loop, identical maths.

    pytest bench/bench_papa_update.py -s

The reference loop runs one UNet call per (sample, timestep) at batch 1 and keeps every graph until one backward per
sample; papa pushes the same items through the UNet in chunks of 100 and back-propagates chunk by chunk. Both in fresh
processes (so peak RSS is comparable), same samples, same noise, same timesteps (t ∈ [800, 999], 2 samples: a tenth
of a reference round's 1000 steps keeps the benchmark short; the reference's memory grows with the number of steps,
papa's does not). Floors (issue 3): ≥ 3× faster, peak memory no higher; the updated weights agree.
"""
import json
import os
import subprocess
import sys

from benchutil import ROOT

CHILD = ROOT / "bench" / "papa_update_child.py"


def _run(mode: str) -> dict:
    threads = os.environ.get("PAPA_BENCH_THREADS", "2")
    r = subprocess.run([sys.executable, str(CHILD), mode, threads], capture_output=True, text=True, check=True,
                       env={**os.environ, "TRITON_INTERPRET": ""})
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_papa_update_vs_reference_loop(benchmark):
    ref = _run("reference")
    fast = benchmark.pedantic(lambda: _run("papa"), rounds=1, iterations=1)
    speedup = ref["seconds"] / fast["seconds"]
    mem = fast["peak_rss_mib"] / ref["peak_rss_mib"]
    benchmark.extra_info.update(reference=ref, papa=fast, speedup=speedup, memory_ratio=mem)
    print(f"\nPAPA update, {fast['unet_items']} UNet items: reference loop {ref['seconds']:.1f} s "
          f"{ref['peak_rss_mib']:.0f} MiB, papa {fast['seconds']:.1f} s {fast['peak_rss_mib']:.0f} MiB "
          f"-> {speedup:.2f}x, memory {mem:.2f}x")
    assert abs(ref["loss"] - fast["loss"]) <= 1e-4 * max(1.0, abs(ref["loss"]))
    assert abs(ref["checksum"] - fast["checksum"]) <= 1e-3 * max(1.0, abs(ref["checksum"]))
    assert speedup >= 3.0, f"papa update only {speedup:.2f}x the reference loop (floor 3x)"
    assert mem <= 1.0, f"papa update peak memory {mem:.2f}x the reference loop's"
