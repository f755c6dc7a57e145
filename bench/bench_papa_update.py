"""PAPA update: papa's chunked, accumulated work list against the reference's loop, identical maths.

    pytest bench/bench_papa_update.py -s        (PAPA_BENCH_THREADS=2 for the 2-thread figure)

The reference loop runs one UNet call per (sample, timestep) at batch 1 and keeps every graph until one backward per
sample; papa pushes the same items through the UNet in chunks of 100 and back-propagates chunk by chunk. Each mode
lives in a process of its own (so each peak RSS is its own), started once; the parent asks them for updates in
alternation (reference, papa, reference, papa, …: `benchutil.alternated`) and gates on the median of the per-pair
ratios of the update times (process start excluded). Same sample, noise and timesteps (t ∈ [800, 999]: a fifth of a
reference round's 1000 steps keeps the benchmark short; the reference's memory grows with the number of steps,
papa's does not). Floors, set to hold with a second job on the 2-core machine at one thread: ≥ 2× faster (the
idle 2-thread target, 3×, is met on the idle machine: bench/README.md), peak memory no higher; every update gives the
same weights.
"""
import json
import os
import subprocess
import sys

from benchutil import ROOT, Paired, alternated, bench_threads

CHILD = ROOT / "bench" / "papa_update_child.py"
N_SAMPLES, K = 1, 800


class Worker:
    """A child process holding one mode's models; `run()` asks it for one update and returns its JSON record."""

    def __init__(self, mode: str, threads: int):
        self.p = subprocess.Popen([sys.executable, str(CHILD), mode, str(threads), str(N_SAMPLES), str(K)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "TRITON_INTERPRET": ""})
        self.records: list[dict] = []

    def wait_ready(self) -> None:
        line = self.p.stdout.readline()
        assert "ready" in line, f"papa_update_child did not start (exit {self.p.poll()})"

    def run(self) -> dict:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"papa_update_child died (exit {self.p.wait()})"
        self.records.append(json.loads(line))
        return self.records[-1]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def test_papa_update_vs_reference_loop(benchmark):
    threads = bench_threads()
    ref, fast = Worker("reference", threads), Worker("papa", threads)
    try:
        ref.wait_ready(), fast.wait_ready()  # both start at once: the imports overlap
        alternated(ref.run, fast.run, reps=3, warmup=1, benchmark=benchmark)  # a first update is slower
        ref.records, fast.records = ref.records[1:], fast.records[1:]
    finally:
        ref.close(), fast.close()
    # the gate times the update inside each child, not the pipe round trip
    m = Paired([r["seconds"] for r in ref.records], [r["seconds"] for r in fast.records])
    mem = fast.records[-1]["peak_rss_mib"] / ref.records[-1]["peak_rss_mib"]
    benchmark.extra_info.update(m.info("reference_loop", "papa"), memory_ratio=mem, threads=threads,
                                reference_peak_rss_mib=ref.records[-1]["peak_rss_mib"],
                                papa_peak_rss_mib=fast.records[-1]["peak_rss_mib"])
    print(f"\nPAPA update, {fast.records[0]['unet_items']} UNet items, {threads} thread(s): "
          f"{m.line('reference loop', 'papa', unit=1, suffix='s')}; peak RSS {ref.records[-1]['peak_rss_mib']:.0f} "
          f"vs {fast.records[-1]['peak_rss_mib']:.0f} MiB -> memory {mem:.2f}x")
    for r in ref.records + fast.records:  # every update, of either mode, did the same maths
        assert abs(r["loss"] - ref.records[0]["loss"]) <= 1e-4 * max(1.0, abs(ref.records[0]["loss"]))
        assert abs(r["checksum"] - ref.records[0]["checksum"]) <= 1e-3 * max(1.0, abs(ref.records[0]["checksum"]))
    assert m.ratio >= 2.0, f"papa update only {m.ratio:.2f}x the reference loop (floor 2x)"
    assert mem <= 1.0, f"papa update peak memory {mem:.2f}x the reference loop's"
