"""The two classifiers: the *oracle* that plays the user, and an independent *evaluator* that judges every metric.

Either may have an 11th output, `REJECT_CLASS`: "not a member of any class" (trained by `python -m papa.oracle` on
synthetic negatives from papa.negatives, with style augmentation so that thin, bold, slanted and shifted images stay
accepted).

The oracle is the PyTorch MNIST-example CNN of the reference (keys as in `tests/data/oracle_classifier_state_dict.tsv`),
so reference `mnist_classifier.pt` files load directly. The evaluator is a different architecture (batch-normalised
VGG-style CNN) trained with a different seed and optimiser, so that alignment is never judged by the network that gave
the feedback. Both take 1×28×28 inputs in [−1, 1] and return log-probabilities; `features()` gives the penultimate
activations used for FID.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class OracleCNN(nn.Module):
    """conv 1→32 k3, conv 32→64 k3, relu, maxpool 2, dropout .25, fc 9216→128, relu, dropout .5, fc 128→10 (11 with
    the reject class)."""

    head_key = "fc2"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(self.dropout2(self.features(x))), dim=1)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class EvaluatorCNN(nn.Module):
    """28→14→7→3 VGG-style blocks (32, 64, 128), global average pool, 128-d features, linear head."""

    feature_dim = 128
    head_key = "head"

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(_block(1, 32), _block(32, 64), _block(64, 128))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.dropout(self.features(x))), dim=1)


CLASSIFIERS = {"oracle": OracleCNN, "evaluator": EvaluatorCNN}
NUM_CLASSES = 10                 # the dataset's classes; a reject-aware classifier has one more output, REJECT_CLASS
REJECT_CLASS = 10                # "not a member of any class" (papa.negatives builds its training images)


def has_reject(net: nn.Module) -> bool:
    """True for a classifier with the extra "not a member of any class" output."""
    head = getattr(net, getattr(net, "head_key", ""), None)
    return getattr(head, "out_features", None) == NUM_CLASSES + 1
