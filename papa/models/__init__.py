"""Models: the UNet (reference and fast), the oracle and evaluator classifiers, and their loading."""
from __future__ import annotations

import torch

from papa.checkpoint import CheckpointError, load, load_state_dict, state_dict_of
from papa.models.classifier import CLASSIFIERS, EvaluatorCNN, OracleCNN
from papa.models.unet import UNet, build_unet

__all__ = ["UNet", "build_unet", "OracleCNN", "EvaluatorCNN", "load_unet", "load_classifier"]


def _load_into(model: torch.nn.Module, path, what: str, weights: str = "auto",
               dataset: str | None = None, sd: dict | None = None) -> torch.nn.Module:
    sd = load_state_dict(path, weights, dataset) if sd is None else sd
    mismatch = _mismatch(model.state_dict(), sd)
    if mismatch:
        raise CheckpointError(f"{what} checkpoint '{path}' does not match the configured architecture ({mismatch}); "
                              "use the config it was trained with")
    model.load_state_dict(sd, strict=True)
    return model


def _mismatch(want: dict, got: dict) -> str:
    """A short account of how two state dicts differ ('' when they fit): counts and one example of each kind."""
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    shape = [k for k in want if k in got and tuple(want[k].shape) != tuple(got[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing, e.g. '{missing[0]}'")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. '{extra[0]}'")
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} of another shape, e.g. '{k}' {tuple(got[k].shape)} vs {tuple(want[k].shape)}")
    return "; ".join(parts)


def load_unet(model_cfg, path, weights: str = "auto", dataset: str | None = None, adapter=None,
              base: str | None = None) -> UNet:
    """Build the configured UNet and load weights (papa or reference checkpoint; from a trainer round checkpoint the
    EMA where it has one, unless `weights` says 'policy'). With `dataset`, a checkpoint that says it was made for
    another dataset is refused. A round checkpoint of an adapter run (adapter.rank > 0) holds the adapter alone: with
    the run's `adapter` settings and its `base` checkpoint, the adapter is loaded onto the base and merged into its
    weights. Returns it in eval mode."""
    obj = load(path)   # read once: its state dict, and for an adapter its saved settings
    sd = state_dict_of(obj, path, weights, dataset)
    from papa.adapters import is_adapter_state
    if not is_adapter_state(sd):
        return _load_into(build_unet(model_cfg), path, "UNet", weights, dataset, sd=sd).eval()
    if adapter is None or adapter.rank == 0 or base is None:
        raise CheckpointError(f"'{path}' holds a low-rank adapter, not a whole UNet; pass the config of the run that "
                              "trained it (--config <run>/config.yaml), whose adapter section says its shape")
    check_adapter_settings(path, adapter, obj)
    from papa.adapters import load_adapter_state, wrap
    model = wrap(load_unet(model_cfg, base, dataset=dataset), adapter)
    try:
        load_adapter_state(model, sd)
    except ValueError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    return model.merge_and_unload().eval()


def check_adapter_settings(path, adapter, obj=None) -> None:
    """An adapter checkpoint's saved shape settings (rank, alpha, targets) must be the config's (`obj`: the file
    already read, else it is read here)."""
    obj = load(path) if obj is None else obj
    saved = obj.get("adapter") if isinstance(obj, dict) else None   # the settings the run saved with its checkpoints
    if isinstance(saved, dict):
        for key in ("rank", "alpha", "targets"):
            want = getattr(adapter, key)
            if key in saved and saved[key] != want:
                raise CheckpointError(f"'{path}' was trained with adapter.{key}={saved[key]!r}, the config says "
                                      f"{want!r}; pass the config of the run that trained it (--config "
                                      "<run>/config.yaml)")


def load_adapter(path, adapter, dataset: str | None = None) -> dict:
    """The adapter weights of an adapter checkpoint (a round checkpoint of an adapter run, its EMA where it has one;
    or a mixture file), checked to hold an adapter made with the config's `adapter` settings."""
    from papa.adapters import is_adapter_state
    obj = load(path)
    sd = state_dict_of(obj, path, "auto", dataset)
    if not is_adapter_state(sd):
        raise CheckpointError(f"'{path}' holds a whole UNet, not a low-rank adapter; adapter.init must be an adapter "
                              "run's checkpoint")
    check_adapter_settings(path, adapter, obj)
    return sd


def load_classifier(kind: str, path, dataset: str | None = None) -> torch.nn.Module:
    """kind: 'oracle' (reference CNN; reference mnist_classifier.pt files load) or 'evaluator'. The number of
    classes (10, or 11 with the reject class) is read from the file."""
    cls = CLASSIFIERS[kind]
    sd = load_state_dict(path, "auto", dataset)
    bias = sd.get(f"{cls.head_key}.bias")
    n = int(bias.shape[0]) if isinstance(bias, torch.Tensor) and bias.ndim == 1 and bias.shape[0] in (10, 11) else 10
    return _load_into(cls(num_classes=n), path, kind, sd=sd).eval()


def shipped_base(dataset: str):
    """(config, frozen base UNet in eval mode, noise schedule) of a dataset's shipped config (configs/<dataset>.yaml):
    what the probes read features from."""
    from papa.config import REPO_ROOT, load_config
    from papa.schedule import NoiseSchedule
    cfg = load_config(REPO_ROOT / "configs" / f"{dataset}.yaml")
    unet = load_unet(cfg.model, cfg.checkpoints.base, dataset=dataset).eval()
    return cfg, unet, NoiseSchedule.from_config(cfg.diffusion)
