"""Batched reverse-diffusion sampling, with ePAPA's switch to the frozen base model for t < k.

Noise is drawn per sample from a generator seeded by (seed, global sample index), all of a sample's noise in one draw
(x_T, then one z per stochastic step), so a sample depends only on its seed and index: not on the batch size, nor on
how the samples are sharded over ranks. The sampler walks `NoiseSchedule.sampling_timesteps(steps)`: all T steps, or a
respaced (strided) chain when steps < T. Each step is one UNet call and one fused step op (`papa.ops.fused_step`).

With `compile_unet=True` the UNet runs through `torch.compile` (inductor: fused C++/OpenMP kernels on CPUs, Triton
on GPUs), compiled once per network and batch shape and cached for the process. Whether it pays for its
compilation (about a minute on the 2-core CPU) depends on the load; bench/bench_sampling.py measures and reports it.

With `precision="bf16"` the UNet runs under `torch.autocast` in bfloat16 (oneDNN's AMX/AVX-512-BF16 kernels on CPUs
that have them, tensor cores on GPUs); ε̂ is cast back to float32 before the step, so the step, the noise and x stay
float32. ε̂ moves by ~4e-3 relative (at most ~2e-2 per pixel) per call, so the samples are not bit-equal to
float32 ones; their evaluator statistics are compared in docs/SAMPLING.md. Training and evaluation inside runs keep
float32 (deterministic, exact).

On CUDA with `cuda_graph=True` the UNet and the fused step are captured once per network into a CUDA graph over
static buffers and replayed every step (shapes are static within a batch), removing per-kernel launch overhead.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from papa import ops
from papa.schedule import NoiseSchedule


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def draw_noise(gens: list[torch.Generator], n_draws: int, image_shape: tuple[int, ...]) -> torch.Tensor:
    """(B, n_draws, *image_shape): draw 0 is x_T, draw i the noise of the i-th stochastic step."""
    return torch.stack([torch.randn((n_draws, *image_shape), generator=g) for g in gens])


_COMPILED: dict[int, torch.nn.Module] = {}


def compiled(net: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(net)`, cached per module for the life of the process (weights stay live parameters)."""
    key = id(net)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(net, dynamic=False)
    return _COMPILED[key]


PRECISIONS = ("fp32", "bf16")


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: a CUDA device with bf16, or a CPU with AVX-512-BF16/AMX (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Autocast(torch.nn.Module):
    """The UNet under bf16 autocast, returning float32 ε̂."""

    def __init__(self, net: torch.nn.Module, device_type: str):
        super().__init__()
        self.net, self.device_type = net, device_type

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(x, t).float()


_AUTOCAST: dict[tuple[int, str], _Autocast] = {}


def autocast_bf16(net: torch.nn.Module, device_type: str) -> _Autocast:
    """The bf16 wrapper of `net`, one per network (so compiled and graphed wrappers are reused across calls; the
    cache holds `net`, so its id stays unique)."""
    key = (id(net), device_type)
    if key not in _AUTOCAST:
        _AUTOCAST[key] = _Autocast(net, device_type)
    return _AUTOCAST[key]


class _GraphedStep:
    """A CUDA graph of `eps = net(x, t); x_prev = fused_step(x, eps, z, coef)` over static buffers."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor):
        self.x, self.z = torch.zeros_like(x), torch.zeros_like(x)
        self.t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.coef = torch.zeros(x.shape[0], 5, device=x.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuDNN autotuning)
            for _ in range(2):
                self._body(net)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body(net)

    def _body(self, net):
        return ops.fused_step(self.x, net(self.x, self.t), self.z, self.coef)[0]

    def __call__(self, x, t, z, coef) -> torch.Tensor:
        self.x.copy_(x), self.t.copy_(t), self.z.copy_(z), self.coef.copy_(coef)
        self.graph.replay()
        return self.out.clone()


@torch.no_grad()
def sample(model: torch.nn.Module, sched: NoiseSchedule, num: int, *, steps: int, sampler: str = "ancestral",
           eta: float = 1.0, seed: int = 0, first_index: int = 0, batch_size: int = 100,
           base_model: torch.nn.Module | None = None, epapa_k: int = 0, image_shape: tuple[int, ...] = (1, 28, 28),
           device: str | torch.device = "cpu", progress: bool = True, cuda_graph: bool = False,
           compile_unet: bool = False, precision: str = "fp32") -> torch.Tensor:
    """Draw `num` images in [−1, 1] (float32, CPU). Steps with t < epapa_k use `base_model` (ePAPA)."""
    if epapa_k > 0 and base_model is None:
        raise ValueError("epapa_k > 0 needs the frozen base model")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16":
        model = autocast_bf16(model, device.type)
        base_model = autocast_bf16(base_model, device.type) if base_model is not None else None
    use_graph = cuda_graph and device.type == "cuda"
    ts = sched.sampling_timesteps(steps)
    out = []
    n_batches = (num + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * len(ts), desc="sampling", disable=not progress, dynamic_ncols=True, mininterval=1)
    for b0 in range(0, num, batch_size):
        idx = range(first_index + b0, first_index + min(num, b0 + batch_size))
        noise = draw_noise(sample_generators(seed, idx), len(ts), image_shape).to(device)
        x = noise[:, 0]
        graphs: dict[int, _GraphedStep] = {}
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            net = base_model if t < epapa_k else model
            if compile_unet and not use_graph:
                net = compiled(net)
            tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            z = noise[:, i + 1] if t_prev >= 0 else torch.zeros_like(x)
            coef = sched.fused_coefficients(tt, torch.full_like(tt, t_prev), sampler, eta)
            if use_graph:
                if id(net) not in graphs:
                    graphs[id(net)] = _GraphedStep(net, x)
                x = graphs[id(net)](x, tt, z, coef)
            else:
                x, _, _ = ops.fused_step(x, net(x, tt), z, coef)  # x_{t_prev}, x̂0, log-prob in one pass
            bar.update(1)
        out.append(x.float().clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)


class Trajectories(dict):
    """Recorded stochastic trajectories, batch first. Keys:
    x (B, S+1, C, H, W): x at every visited step, x[:, 0] = x_T, x[:, -1] = the image;
    x0_hat (B, S, C, H, W): the clamped x̂0 predicted at step j; log_prob (B, S): log π(x_{j+1} | x_j) under the
    sampling model (pixel mean; NaN where σ = 0, which has no density); t, t_prev (S,); coef (S, 5) the fused step's
    coefficients. `images` is x[:, -1]."""

    @property
    def images(self) -> torch.Tensor:
        return self["x"][:, -1]

    def trained_steps(self) -> torch.Tensor:
        """Indices j of the steps with a density (σ > 0): the ones a trajectory loss can train."""
        return torch.nonzero(self["coef"][:, 2] > 0).flatten()


@torch.no_grad()
def sample_trajectories(model: torch.nn.Module, sched: NoiseSchedule, num: int, *, steps: int,
                        sampler: str = "ddim", eta: float = 1.0, seed: int = 0, first_index: int = 0,
                        paired: bool = False, image_shape: tuple[int, ...] = (1, 28, 28),
                        device: str | torch.device = "cpu") -> Trajectories:
    """Sample `num` trajectories and record every step (x_t, t, x_{t−1}, log-prob, x̂0) for trajectory losses.

    `paired`: trajectories 2p and 2p+1 start from the same x_T (seeded by the global pair index) and differ in their
    step noise (D3PO, SDPO). The recorder's buffers are step-major and preallocated; each step is one UNet call and
    one `fused_step(..., out=...)` writing straight into step j's slices (all rows at the same t here; the op takes a
    per-row t as well)."""
    device = torch.device(device)
    ts = sched.sampling_timesteps(steps)
    S = len(ts)
    idx = range(first_index, first_index + num)
    noise = draw_noise(sample_generators(seed, idx), S + 1, image_shape)
    if paired:
        if first_index % 2 or num % 2:
            raise ValueError("paired trajectories need an even count starting at an even index (whole pairs)")
        pairs = draw_noise(sample_generators(seed + 7_777_777, range(first_index // 2, (first_index + num) // 2)), 1,
                           image_shape)[:, 0]
        noise[:, 0] = pairs.repeat_interleave(2, 0)
    noise = noise.to(device)
    xs = torch.empty((S + 1, num, *image_shape), device=device)
    x0s = torch.empty((S, num, *image_shape), device=device)
    lps = torch.empty((S, num), device=device)
    xs[0] = noise[:, 0]
    t_all = torch.tensor(ts, dtype=torch.long)
    tp_all = torch.tensor(ts[1:] + [-1], dtype=torch.long)
    coef_all = sched.fused_coefficients(t_all, tp_all, sampler, eta)
    for j, t in enumerate(ts):
        tt = torch.full((num,), t, device=device, dtype=torch.long)
        coef = coef_all[j].to(device).expand(num, 5).contiguous()
        z = noise[:, j + 1] if tp_all[j] >= 0 else torch.zeros_like(xs[0])
        ops.fused_step(xs[j], model(xs[j], tt), z, coef, out=(xs[j + 1], x0s[j], lps[j]))
    return Trajectories(x=xs.transpose(0, 1).cpu(), x0_hat=x0s.transpose(0, 1).cpu(), log_prob=lps.t().cpu(),
                        t=t_all, t_prev=tp_all, coef=coef_all)
