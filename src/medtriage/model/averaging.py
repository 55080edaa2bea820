"""Class probabilities averaged inside the graph: over the members of an ensemble and over test-time views of the image.

`EnsembleNet` preprocesses the pixels once (its members share the preprocessing), makes the views, runs each
member's backbone once over all of them (stacked along the batch) and returns the log of the mean softmax, which
the export treats as logits: temperature scaling, thresholds, parity and serving then work as for a single
network, with one ONNX Runtime session. A single network with test-time augmentation is an ensemble of one
(`averaged`).

Views (`TTA`), chosen by anatomy:
- "shift": the 3 x 3 grid of shifts by one source pixel of a 28 px MedMNIST image (SHIFT_FRACTION of the
  model's input side; edges replicated), well inside the training translations. It leaves the anatomy as it is.
- "flip": the left-right mirror as well. Not for chest X-rays (the heart is on one side); for tissue tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtriage.errors import ConfigError
from medtriage.model.networks import TriageNet

TTA = ("none", "shift", "flip")
SHIFT_FRACTION = 1 / 28
PROBABILITY_FLOOR = 1e-12  # keeps log finite when every member is certain


def check_tta(tta: str) -> str:
    if tta not in TTA:
        raise ConfigError(f"unknown test-time augmentation '{tta}'", where="export.tta", hint=f"choose one of: {', '.join(TTA)}")
    return tta


def shift_step(size: int) -> int:
    """Pixels of one shift at the model's input side `size` (at least one)."""
    return max(1, round(size * SHIFT_FRACTION))


def views(x: torch.Tensor, tta: str, step: int = 1) -> list[torch.Tensor]:
    """The preprocessed batch `x` [B, C, S, S] as the views `tta` averages over (the image itself first)."""
    if tta == "flip":
        return [x, torch.flip(x, dims=[3])]
    if tta == "shift":
        padded = F.pad(x, (step, step, step, step), mode="replicate")
        height, width = x.shape[-2:]
        offsets = (0, -step, step)
        return [padded[..., step + dy : step + dy + height, step + dx : step + dx + width] for dy in offsets for dx in offsets]
    return [x]


def view_count(tta: str) -> int:
    return len(views(torch.zeros(1, 1, 1, 1), check_tta(tta)))


class EnsembleNet(nn.Module):
    """Mean of member softmax outputs over the `tta` views; returns log-probabilities."""

    def __init__(self, members: Sequence[TriageNet], tta: str = "none"):
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member", where="run ids")
        specs = {m.preprocess.spec for m in members}
        if len(specs) != 1:
            raise ConfigError(
                f"ensemble members preprocess differently: {sorted(map(str, specs))}",
                hint="ensemble runs trained with the same model.preprocess settings",
            )
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)
        self.step = shift_step(members[0].preprocess.spec.size)

    @property
    def preprocess(self):
        """The members' shared preprocessing (the export records its spec in model.json)."""
        return self.members[0].preprocess

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(pixels)
        stacked = torch.cat(views(x, self.tta, self.step))  # [V*B, ...]: one backbone pass per member over every view
        logits = torch.stack([member.backbone(stacked) for member in self.members])  # [M, V*B, K]
        probs = torch.softmax(logits, dim=-1).reshape(-1, x.shape[0], logits.shape[-1])  # [M*V, B, K]
        return torch.log(probs.mean(dim=0).clamp_min(PROBABILITY_FLOOR))

    def describe(self) -> dict:
        """What model.json records of the averaging (under preprocessing.test_time_augmentation)."""
        return {"views": self.tta, "count": view_count(self.tta), "shift_px": self.step if self.tta == "shift" else 0, "in_graph": True}


def averaged(net: TriageNet, tta: str) -> nn.Module:
    """`net` itself without test-time augmentation; else `net` averaged over the `tta` views (an ensemble of one)."""
    return net if check_tta(tta) == "none" else EnsembleNet([net], tta)
