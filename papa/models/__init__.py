"""Models: the UNet (reference and fast), the oracle and evaluator classifiers, and their loading."""
from __future__ import annotations

import torch

from papa.checkpoint import CheckpointError, load_state_dict
from papa.models.classifier import CLASSIFIERS, EvaluatorCNN, OracleCNN
from papa.models.unet import UNet, build_unet

__all__ = ["UNet", "build_unet", "OracleCNN", "EvaluatorCNN", "load_unet", "load_classifier"]


def _load_into(model: torch.nn.Module, path, what: str, weights: str = "auto") -> torch.nn.Module:
    sd = load_state_dict(path, weights)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} checkpoint '{path}' does not match the configured architecture: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return model


def load_unet(model_cfg, path, weights: str = "auto") -> UNet:
    """Build the configured UNet and load weights (papa or reference checkpoint; from a trainer round checkpoint the
    EMA where it has one, unless `weights` says 'policy'). Returns it in eval mode."""
    return _load_into(build_unet(model_cfg), path, "UNet", weights).eval()


def load_classifier(kind: str, path) -> torch.nn.Module:
    """kind: 'oracle' (reference CNN; reference mnist_classifier.pt files load) or 'evaluator'."""
    return _load_into(CLASSIFIERS[kind](), path, kind).eval()
