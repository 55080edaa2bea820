"""Class probabilities averaged inside the graph: over the members of an ensemble and over test-time views of the image.

`EnsembleNet` preprocesses the pixels once per input size its members take (members may differ in the size their
images are upsampled to, and in nothing else of the preprocessing), makes the views, runs each member's backbone once
over all of them (stacked along the batch) and returns the log of the mean softmax over members and views, which
the export treats as logits: temperature scaling, thresholds, parity and serving then work as for a single
network, with one ONNX Runtime session. A single network with test-time augmentation is an ensemble of one
(`averaged`).

Views (`TTA`), chosen by anatomy:
- "shift": the 3 x 3 grid of shifts by one source pixel of a 28 px MedMNIST image (SHIFT_FRACTION of the
  model's input side; edges replicated), well inside the training translations. It leaves the anatomy as it is.
- "affine": the shift grid, and the image turned by ±ROTATION_DEG and zoomed by the ZOOMS (bilinear, edges
  replicated), inside the training augmentation's rotations (10 degrees) and scales (10%). Still no mirror image.
- "flip": the left-right mirror as well. Not for chest X-rays (the heart is on one side); for tissue tiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtriage.errors import ConfigError
from medtriage.model.networks import TriageNet

TTA = ("none", "shift", "affine", "flip")
SHIFT_FRACTION = 1 / 28
ROTATION_DEG = 5.0
ZOOMS = (0.95, 1.05)
SHIFTED = ("shift", "affine")  # the view sets that start with the shift grid
PROBABILITY_FLOOR = 1e-12  # keeps log finite when every member is certain


def check_tta(tta: str) -> str:
    if tta not in TTA:
        raise ConfigError(f"unknown test-time augmentation '{tta}'", where="export.tta", hint=f"choose one of: {', '.join(TTA)}")
    return tta


def shift_step(size: int) -> int:
    """Pixels of one shift at the model's input side `size` (at least one)."""
    return max(1, round(size * SHIFT_FRACTION))


def warps(tta: str) -> list[tuple[float, float]]:
    """(rotation in degrees, zoom) of each resampled view of `tta`, after its shifts."""
    if tta != "affine":
        return []
    return [(-ROTATION_DEG, 1.0), (ROTATION_DEG, 1.0), *((0.0, zoom) for zoom in ZOOMS)]


def sampling_grid(size: int, rotation_deg: float, zoom: float) -> torch.Tensor:
    """grid_sample's grid [1, size, size, 2] that turns a `size` px image about its centre and zooms it by `zoom`."""
    turn = math.radians(rotation_deg)
    cos, sin = math.cos(turn) / zoom, math.sin(turn) / zoom
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]])
    return F.affine_grid(theta, [1, 1, size, size], align_corners=False)


def warp_grids(tta: str, size: int) -> torch.Tensor:
    """The grids [V, size, size, 2] of `tta`'s resampled views (none: V = 0)."""
    grids = [sampling_grid(size, *warp) for warp in warps(tta)]
    return torch.cat(grids) if grids else torch.empty(0, size, size, 2)


def views(x: torch.Tensor, tta: str, step: int = 1, grids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The preprocessed batch `x` [B, C, S, S] as the views `tta` averages over (the image itself first); `grids`
    ([V, S, S, 2], `warp_grids`) are the resampled views of "affine", made here unless given (once per input size)."""
    if tta == "flip":
        return [x, torch.flip(x, dims=[3])]
    if tta not in SHIFTED:
        return [x]
    padded = F.pad(x, (step, step, step, step), mode="replicate")
    height, width = x.shape[-2:]
    offsets = (0, -step, step)
    shifted = [padded[..., step + dy : step + dy + height, step + dx : step + dx + width] for dy in offsets for dx in offsets]
    if grids is None:
        grids = warp_grids(tta, width)
    resampled = [
        F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False)
        for grid in grids[:, None]
    ]
    return shifted + resampled


def view_count(tta: str) -> int:
    return len(views(torch.zeros(1, 1, 2, 2), check_tta(tta)))


class EnsembleNet(nn.Module):
    """Mean of member softmax outputs over the `tta` views; returns log-probabilities. Members that take one input size
    share one resize and one set of views (a `size_groups` entry)."""

    def __init__(self, members: Sequence[TriageNet], tta: str = "none"):
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member", where="run ids")
        _check_preprocessing_alike(members)
        self.members = nn.ModuleList(members)
        self.tta = check_tta(tta)
        self.groups: dict[int, list[int]] = {}  # input size -> its members, in order of first appearance
        for k, member in enumerate(members):
            self.groups.setdefault(member.preprocess.spec.size, []).append(k)
        for size in self.groups:
            # Constants of the graph (ONNX GridSample reads them); not weights, so not in the state dict.
            self.register_buffer(f"grids_{size}px", warp_grids(self.tta, size), persistent=False)

    @property
    def preprocess(self):
        """The preprocessing of the members' largest input (the export records its spec in model.json: decoding and
        saliency need no finer image); the members' preprocessing differs in nothing else."""
        return self.members[self.groups[max(self.groups)][0]].preprocess

    @property
    def sizes(self) -> list[int]:
        return sorted(self.groups)

    def size_groups(self) -> list[tuple[EnsembleNet, int]]:
        """(the members of one input size as an ensemble of their own, with the same views; their count) per size. The
        whole ensemble's probability is the member-weighted mean of theirs: each scores its images resized once."""
        if len(self.groups) == 1:
            return [(self, len(self.members))]
        return [(EnsembleNet([self.members[k] for k in group], self.tta), len(group)) for group in self.groups.values()]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = []
        for size, group in self.groups.items():
            x = self.members[group[0]].preprocess(pixels)
            stacked = torch.cat(views(x, self.tta, shift_step(size), getattr(self, f"grids_{size}px")))  # [V*B, ...]
            logits = torch.stack([self.members[k].backbone(stacked) for k in group])  # [M, V*B, K]: one pass per member
            probs.append(torch.softmax(logits, dim=-1).reshape(-1, pixels.shape[0], logits.shape[-1]))  # [M*V, B, K]
        return torch.log(torch.cat(probs).mean(dim=0).clamp_min(PROBABILITY_FLOOR))

    def describe(self) -> dict:
        """What model.json records of the averaging (under preprocessing.test_time_augmentation)."""
        steps = [shift_step(size) if self.tta in SHIFTED else 0 for size in self.sizes]
        described = {"views": self.tta, "count": view_count(self.tta), "shift_px": steps[0] if len(steps) == 1 else steps}
        if warped := warps(self.tta):
            described |= {"rotations_deg": [r for r, _ in warped if r], "zooms": [z for _, z in warped if z != 1.0]}
        return described | {"in_graph": True}


def _check_preprocessing_alike(members: Sequence[TriageNet]) -> None:
    """Members may be upsampled to different sizes (each size resized once), but must read the pixels alike otherwise."""
    others = {dataclasses.replace(m.preprocess.spec, size=0) for m in members}
    if len(others) != 1:
        raise ConfigError(
            f"ensemble members preprocess differently: {sorted(map(str, {m.preprocess.spec for m in members}))}",
            hint="ensemble runs trained with the same model.preprocess settings (model.preprocess.size may differ)",
        )


def averaged(net: TriageNet, tta: str) -> nn.Module:
    """`net` itself without test-time augmentation; else `net` averaged over the `tta` views (an ensemble of one)."""
    return net if check_tta(tta) == "none" else EnsembleNet([net], tta)
