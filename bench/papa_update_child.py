"""One PAPA update per request, in a process of its own so that its peak RSS is its own:
`python bench/papa_update_child.py MODE THREADS N_SAMPLES K`, then one line `run` on stdin per update (EOF ends it).

MODE reference: what the reference code does: per sample (batch 1), one UNet call per timestep with every graph
kept, QPDE at the last step, one backward at the end, then the optimiser step.
MODE papa: papa's engine maths: the same work list pushed through the UNet in chunks of `timestep_chunk` items,
backward per chunk (gradients accumulate), the same optimiser step per sample.
Every update starts from the same weights and a fresh optimiser, so all updates of both modes do the same maths.
Each prints one JSON line: seconds (the update only, not the process start), peak RSS so far (MiB), loss, and a
checksum of the updated weights.
"""
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from papa.algos.papa import chunk_loss, papa_weights, plan_items  # noqa: E402
from papa.config import load_config  # noqa: E402
from papa.models import build_unet, load_unet  # noqa: E402
from papa.schedule import NoiseSchedule  # noqa: E402


def main(mode: str, threads: int, n_samples: int, k: int, chunk: int = 100) -> None:
    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"papa.epapa_k={k}", "papa.timesteps_per_sample=0",
                                                          f"train.timestep_chunk={chunk}"])
    settings = cfg.methods["papa"]
    path = ROOT / cfg.checkpoints.base
    model = load_unet(cfg.model, path) if path.is_file() else build_unet(cfg.model)
    base = load_unet(cfg.model, path) if path.is_file() else build_unet(cfg.model)
    base.requires_grad_(False)
    start = {name: v.clone() for name, v in model.state_dict().items()}
    sched = NoiseSchedule.from_config(cfg.diffusion)
    lam = papa_weights(sched, settings.t0_weight, settings.weighting)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((n_samples, 1, 28, 28), generator=g) * 2 - 1
    y = torch.tensor([1.0, -1.0] * n_samples)[:n_samples]
    print(json.dumps({"ready": mode}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        model.load_state_dict(start)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        t0 = time.perf_counter()
        total, n_items = 0.0, 0
        for i in range(n_samples):  # batch 1, as the reference
            items = plan_items(x[i:i + 1], y[i:i + 1], sched, settings, lam, torch.Generator().manual_seed(i))
            n_items += len(items)
            opt.zero_grad()
            if mode == "reference":
                loss = sum(chunk_loss(model, base, x[i:i + 1], items.slice(slice(j, j + 1)), sched)
                           for j in range(len(items)))
                loss.backward()
                total += loss.item()
            else:
                for c in range(0, len(items), chunk):
                    loss = chunk_loss(model, base, x[i:i + 1], items.slice(slice(c, c + chunk)), sched)
                    loss.backward()
                    total += loss.item()
            opt.step()
        secs = time.perf_counter() - t0
        checksum = sum(p.double().sum().item() for p in model.parameters())
        print(json.dumps({"mode": mode, "seconds": secs, "loss": total, "checksum": checksum, "unet_items": n_items,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
