"""An out-of-distribution score inside the served graph, from the network's penultimate features.

Headers can lie (a CT slice saved as CR), so the served graph also says how unlike the training
images an input is: the Mahalanobis distance of its penultimate features to the nearest training
class mean, with one covariance shared by the classes (Lee et al., NeurIPS 2018), shrunk with
Ledoit-Wolf because there are fewer training images than feature dimensions would need. The
threshold is the validation quantile that flags a stated share of in-distribution images.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtriage.errors import InputError, PackageError
from medtriage.evaluation.operating_points import flagging_threshold
from medtriage.model.averaging import EnsembleNet

OOD_NAME = "ood_score"
FALSE_ALARM_RATE = 0.01
F32_MAX = float(np.finfo(np.float32).max)
RELATIVE_TOLERANCE = 1e-3  # share of validation images flagged: the threshold is their 99th percentile
METHOD = "Mahalanobis distance to the nearest training class mean, shared Ledoit-Wolf covariance"
log = logging.getLogger(__name__)


@dataclass
class OodData:
    """Images the OOD score is fitted on (training) and thresholded on (validation); each `[C, H, W]` in [0, 1].
    `per_member` (fold models): each member's own training and held-out images; each member is then fitted and scaled
    on its own, and `val_images` scored by the members that held each out, standing in for the ensemble (as the
    out-of-fold calibration does). `holders` lists the members that held out each fold (one per cross-validation of
    the same cut): they hold out the same images, and their mean scores them; the folds' held-out sets, in that order,
    make up `val_images`."""

    train_images: Sequence[np.ndarray]
    train_labels: np.ndarray
    val_images: Sequence[np.ndarray]
    per_member: Sequence[OodData] | None = None
    holders: Sequence[Sequence[int]] = ()

    def member(self, k: int) -> OodData:
        return self.per_member[k] if self.per_member is not None else self


class MahalanobisDistance(nn.Module):
    """features `[B, D]` -> distance to the nearest class mean under a shared precision matrix, `[B]`."""

    def __init__(self, means: np.ndarray, precision: np.ndarray, scale: float = 1.0):
        super().__init__()
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32))
        self.register_buffer("precision", torch.tensor(precision, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(float(scale)))  # this layer's validation quantile

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features[:, None, :] - self.means[None]  # [B, K, D]
        squared = ((centred @ self.precision) * centred).sum(dim=-1)  # [B, K]
        return squared.min(dim=1).values.clamp_min(0.0).sqrt() / self.scale


class ResNetTaps(nn.Module):
    """A TriageNet with a MONAI ResNet backbone, returning the spatially pooled output of each residual
    stage; the last one is the penultimate feature vector the final layer reads."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.preprocess, self.backbone = net.preprocess, net.backbone

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = b.act(b.bn1(b.conv1(self.preprocess(pixels))))
        if not b.no_max_pool:
            x = b.maxpool(x)
        taps = []
        for stage in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = stage(x)
            taps.append(x.mean(dim=(2, 3)))
        return taps


class PenultimateTap(nn.Module):
    """Any other network: only its penultimate features (the input of its last linear layer)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(pixels)]


def feature_taps(net: nn.Module) -> tuple[nn.Module, nn.Linear, str]:
    """(module returning a list of feature vectors, the final linear layer, which features they are)."""
    backbone = getattr(net, "backbone", None)
    if all(hasattr(backbone, a) for a in ("conv1", "layer1", "layer4", "fc", "no_max_pool")):
        return ResNetTaps(net).eval(), backbone.fc, "pooled output of each residual stage (the last is the penultimate layer)"
    features, head = split_head(net)
    return PenultimateTap(features).eval(), head, "penultimate features"


def split_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(a copy of `net` that returns penultimate features, its final Linear layer). The final layer is the
    last nn.Linear the network holds (DenseNet `class_layers.out`, EfficientNet `_fc`)."""
    linears = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise PackageError(
            f"the network ({type(net).__name__}) has no final linear layer to take penultimate features from",
            where="export.ood",
            hint="export without an OOD score (export.ood=false)",
        )
    features = copy.deepcopy(net)
    parent_name, _, attribute = linears[-1].rpartition(".")
    parent = features.get_submodule(parent_name) if parent_name else features
    head = getattr(parent, attribute)
    setattr(parent, attribute, nn.Identity())
    return features.eval(), head


@torch.no_grad()
def tapped_features(taps: nn.Module, images: Sequence[np.ndarray], batch_size: int = 128) -> list[np.ndarray]:
    """Per tap, features `[N, D]` of images of any sizes (batched by size)."""
    out: list = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(np.shape(image)), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batch = torch.from_numpy(np.stack([np.asarray(images[i], dtype=np.float32) for i in chunk]))
            tapped = [t.double().numpy() for t in taps(batch)]
            for j, i in enumerate(chunk):
                out[i] = [t[j] for t in tapped]
    return [np.stack([row[k] for row in out]) for k in range(len(out[0]))]


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> MahalanobisDistance:
    from sklearn.covariance import LedoitWolf

    labels = np.asarray(labels).astype(int)
    classes = np.unique(labels)
    means = np.stack([features[labels == k].mean(axis=0) for k in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = LedoitWolf().fit(centred).covariance_
    return MahalanobisDistance(means, np.linalg.pinv(covariance, hermitian=True))


class OodScore(nn.Module):
    """Tapped features -> max over taps of (distance / that tap's validation quantile): one number per image."""

    def __init__(self, distances: Sequence[MahalanobisDistance]):
        super().__init__()
        self.distances = nn.ModuleList(distances)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([d(t) for d, t in zip(self.distances, taps)], dim=1).max(dim=1).values


class ScoredNet(nn.Module):
    """The served model as a torch module: calibrated probabilities and the OOD score, from one pass. An ensemble's
    OOD score is the mean over its members of each member's own score, read from that member's features."""

    output_names = ("probabilities", OOD_NAME)

    def __init__(self, net: nn.Module, taps: Sequence[nn.Module], head: nn.Linear | None, temperature: float, scores: Sequence[OodScore]):
        super().__init__()
        # `net`: what is served (and its preprocessing); `head`: a lone network's last layer (None for an average)
        self.net, self.head = net, head
        self.taps, self.scores = nn.ModuleList(taps), nn.ModuleList(scores)  # one of each per member
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = [member_taps(pixels) for member_taps in self.taps]
        # Averaged over members or test-time views, the served probabilities come from the whole average; the taps
        # read the image. A lone network's logits come from its taps: one pass.
        logits = self.net(pixels) if isinstance(self.net, EnsembleNet) else self.head(taps[0][-1])
        return torch.softmax(logits / self.temperature, dim=-1), self.ood_score(taps)

    def ood_score(self, taps: Sequence[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([score(member) for score, member in zip(self.scores, taps)], dim=1).mean(dim=1)


@dataclass
class OodFit:
    model: ScoredNet
    val_scores: np.ndarray
    block: dict  # model.json -> ood


def fit_ood(net: nn.Module, temperature: float, data: OodData, false_alarm_rate: float = FALSE_ALARM_RATE) -> OodFit:
    """Per network (each member of an ensemble): fit a distance per tap on training features and scale each by its
    validation quantile; the score is the maximum over taps, averaged over members, thresholded on validation at
    `false_alarm_rate`. Checks that each tapped network reproduces its own logits. Test-time views are served
    averaged; the distances read the image itself. With `data.per_member` (fold models) each member uses its own
    images, and validation is scored member by member (see OodData)."""
    served = net.eval()
    members = list(served.members) if isinstance(served, EnsembleNet) else [served]
    if data.per_member is not None and len(data.per_member) != len(members):
        raise PackageError(
            f"OOD images given for {len(data.per_member)} members; the ensemble has {len(members)}",
            where="OodData.per_member",
            hint="give each member of the ensemble its own training and held-out images, in the members' order",
        )
    if data.per_member is not None and sorted(k for fold in data.holders for k in fold) != list(range(len(members))):
        raise PackageError(
            f"the folds' holders {data.holders} do not name each of the {len(members)} members once",
            where="OodData.holders",
            hint="list, per fold, the members that held it out (export_fold_ensemble builds them from the fold runs)",
        )
    taps, scores, val_features = [], [], []
    for k, member in enumerate(members):
        own = data.member(k)
        whose = "" if data.per_member is None else f"fold member {k}'s "
        _check_images(own, whose)
        member_taps, head, which = feature_taps(member)
        train = tapped_features(member_taps, own.train_images)
        for train_k in train:
            _check_train_features(train_k, whose)
        val = tapped_features(member_taps, own.val_images)
        first = _first_val_index(data, k)
        scores.append(
            OodScore(
                [_scaled_distance(train_k, own.train_labels, val_k, false_alarm_rate, first, whose) for train_k, val_k in zip(train, val)]
            )
        )
        _check_split(member, member_taps, head, own.val_images[:4])
        taps.append(member_taps)
        val_features.append([torch.from_numpy(v).float() for v in val])
    model = ScoredNet(served, taps, None if isinstance(served, EnsembleNet) else head, temperature, scores).eval()
    with torch.no_grad():
        if data.per_member is None:
            val_scores = model.ood_score(val_features).double().numpy()
        else:  # each held-out image scored by the mean of the members that held it out, in `val_images`' order
            val_scores = np.concatenate(
                [np.mean([scores[k](val_features[k]).double().numpy() for k in fold], axis=0) for fold in data.holders]
            )
    threshold = flagging_threshold(
        val_scores,
        false_alarm_rate,
        where="export.ood",
        hint="an image far outside the training images' range (its features overflow) or a diverged model scores so: find it "
        "among the validation images, or export without the OOD score (export.ood=false)",
    )
    block = {
        "output": OOD_NAME,
        "method": f"{METHOD} ({which}); the score is the largest distance over layers, each divided by its validation 99th "
        f"percentile{_members_text(len(members), data.per_member is not None)}",
        "threshold": threshold,
        "false_alarm_rate": false_alarm_rate,
        "val_flagged": float(np.mean(val_scores > threshold)),
        "threshold_split": "val" if data.per_member is None else "out-of-fold",
        "threshold_images": len(val_scores),
        "fit": {
            "split": "train",
            "images": len(data.train_images) if data.per_member is None else sum(len(own.train_images) for own in data.per_member),
            "features": [int(v.shape[1]) for v in val_features[0]],
            "members": len(members),
        },
    }
    note = _too_few_note(len(val_scores), false_alarm_rate)
    if note:
        block["note"] = note
        log.warning("OOD score: %s", note)
    log.info("OOD score: threshold %.3f flags %.1f%% of validation", threshold, 100 * block["val_flagged"])
    return OodFit(model, val_scores, block)


def _too_few_note(images: int, false_alarm_rate: float) -> str | None:
    """Fewer images than 1 / rate have no quantile at that rate: the threshold falls between the highest scores."""
    needed = math.ceil(1.0 / false_alarm_rate - 1e-9)
    if images >= needed:
        return None
    return (
        f"set on {images} validation images, fewer than the {needed} a false-alarm rate of {false_alarm_rate:g} needs: it "
        f"lies between their highest scores, so it flags about 1 in {images}, not 1 in {needed}; export from a larger "
        "validation split for the stated rate"
    )


def _members_text(count: int, per_member: bool) -> str:
    if count == 1:
        return ""
    if not per_member:
        return f", averaged over the {count} members"
    return (
        f", averaged over the {count} fold members; each member is fitted on its own training images and scaled on the "
        "images it held out, and the threshold is set on each held-out image's score by the members that held it out "
        "(their mean standing in for the ensemble's, as in the out-of-fold calibration)"
    )


def _scaled_distance(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, false_alarm_rate: float, first: int = 0, whose: str = ""
) -> MahalanobisDistance:
    """The distance fitted on `train`, scaled by its quantile over `val` (the validation images from index `first` on);
    `whose` names the member the training images are of, in a refusal."""
    distance = fit_mahalanobis(train, train_labels)
    with torch.no_grad():
        train_distances = distance(torch.from_numpy(train).float()).numpy()
        _refuse_training_images(~np.isfinite(train_distances), train_distances, ("a NaN or infinite OOD distance", "distance"), whose)
        val_distances = distance(torch.from_numpy(val).float()).numpy()
        _check_val_distances(val_distances, first)
        distance.scale.fill_(float(np.quantile(val_distances, 1.0 - false_alarm_rate)))
    _check_scale(distance, train_labels, whose)
    return distance


def _check_scale(distance: MahalanobisDistance, train_labels: np.ndarray, whose: str) -> None:
    """A zero quantile divides every score by zero, NaN for every validation image; its cause is the training features
    (one image per class, or a layer constant over the images), which leave a zero covariance and so zero distances."""
    if float(distance.scale) > 0:
        return
    classes, counts = np.unique(np.asarray(train_labels).astype(int), return_counts=True)
    per_class = ", ".join(f"class {c}: {n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
    cause = (
        f"the training features ({len(train_labels)} images; {per_class}) do not vary within their classes (a zero covariance)"
        if not torch.any(distance.precision)
        else "the validation images' features lie at the training class means"
    )
    raise InputError(
        f"{whose}OOD distances are 0 at the validation quantile, so every OOD score would be 0/0: {cause}",
        where="export.ood",
        hint="fit on more training images, 2 or more of each class (export.ood_fit_images, or a larger training split), "
        "or export without the OOD score (export.ood=false)",
    )


def _check_images(data: OodData, whose: str) -> None:
    """The fit needs training images, one label each, and the threshold validation images: refused here, by what is
    missing, rather than as an index error deep in the feature extraction."""
    counts = {
        "training images": len(data.train_images),
        "training labels": len(data.train_labels),
        "validation images": len(data.val_images),
    }
    if min(counts.values()) == 0 or counts["training images"] != counts["training labels"]:
        raise InputError(
            f"{whose}OOD images cannot be fitted on: " + ", ".join(f"{n} {what}" for what, n in counts.items()),
            where="export.ood",
            hint="export from a pool whose train and val splits hold images (export.ood_fit_images of at least 1), one label "
            "per training image, or export without the OOD score (export.ood=false)",
        )


def _check_train_features(features: np.ndarray, whose: str) -> None:
    """The served distance squares features in float32: a training image whose squared features float32 cannot hold
    leaves it a covariance it cannot invert, and every validation image a NaN score (the first of them blamed)."""
    squared = np.square(features).sum(axis=1)
    _refuse_training_images(
        ~(squared <= F32_MAX), squared, ("OOD features that are not finite or overflow float32 once squared", "squared norm"), whose
    )


def _refuse_training_images(bad: np.ndarray, values: np.ndarray, what: tuple[str, str], whose: str) -> None:
    """Refuse the first training image flagged in `bad`, with its value and how many more there are; `what`: (what it
    has, what `values` are)."""
    (problem, measure), bad = what, np.flatnonzero(bad)
    if len(bad):
        more = f"; {len(bad) - 1} more after it" if len(bad) > 1 else ""
        raise InputError(
            f"{whose}training image {bad[0]} (counting from 0, in the order given) has {problem} ({measure} {values[bad[0]]:.3g}{more}): "
            "no OOD distance can be fitted on it",
            where="export.ood",
            hint="an image far outside the other images' range (its features overflow) or a diverged model gives one: find "
            "it among the training images the OOD score is fitted on and fix or drop it, or export without the OOD score "
            "(export.ood=false)",
        )


def _check_val_distances(distances: np.ndarray, first: int) -> None:
    """One infinite distance makes the quantile infinite, and every score divided by it NaN: refused by its image."""
    bad = np.flatnonzero(~np.isfinite(distances))
    if len(bad):
        more = f"; {len(bad) - 1} more after it" if len(bad) > 1 else ""
        raise InputError(
            f"validation image {first + bad[0]} (counting from 0, in the order given) has a NaN or infinite OOD distance "
            f"({distances[bad[0]]}{more}): no OOD threshold can be set on it",
            where="export.ood",
            hint="an image far outside the training images' range (its features overflow) or a diverged model gives one: "
            "find it among the validation images and fix or drop it, or export without the OOD score (export.ood=false)",
        )


def _first_val_index(data: OodData, k: int) -> int:
    """Where member `k`'s held-out images begin in `data.val_images` (the folds' held-out sets, in fold order)."""
    if data.per_member is None:
        return 0
    fold = next(f for f, holders in enumerate(data.holders) if k in holders)
    return sum(len(data.member(holders[0]).val_images) for holders in data.holders[:fold])


def _check_split(net: nn.Module, taps: nn.Module, head: nn.Linear, images: Sequence[np.ndarray]) -> None:
    """The tapped features + head must reproduce the network's logits, or the OOD score reads the wrong layers."""
    with torch.no_grad():
        for image in images:
            batch = torch.from_numpy(np.asarray(image, dtype=np.float32)[None])
            if not torch.allclose(net(batch), head(taps(batch)[-1]), atol=1e-4):
                raise PackageError(
                    f"the last linear layer of the network ({type(net).__name__}) is not its output layer: no OOD score can be attached",
                    where="export.ood",
                    hint="export without an OOD score (export.ood=false)",
                )


def ood_parity(path, model: ScoredNet, images: Sequence[np.ndarray], where: str | Path | None = None) -> dict:
    """Served (ONNX Runtime) against torch OOD scores on `images`; raises when they differ by more than
    1e-3 relative: the threshold was chosen on torch scores and must mean the same in serving. Its refusals name
    `where` (the graph's place in its package), else `path`."""
    from medtriage.export.onnx import INPUT_NAME, onnx_session

    where = where or path
    if len(images) == 0:
        raise PackageError(
            "no validation images for the OOD parity check",
            where=where,
            hint="give the export validation images (parity_images); from a pool, its val split is empty: rebuild the pool with one",
        )
    session, worst = onnx_session(path), 0.0
    for count, image in enumerate(images, start=1):
        batch = np.ascontiguousarray(np.asarray(image, dtype=np.float32)[None])
        with torch.no_grad():
            expected = model(torch.from_numpy(batch))[1].double().numpy()
        served = session.run([OOD_NAME], {INPUT_NAME: batch})[0].astype(np.float64)
        if not (np.isfinite(served).all() and np.isfinite(expected).all()):  # NaN would pass max() and the tolerance
            raise PackageError(
                f"the model returns a NaN or infinite OOD score on validation image {count}: serving would never flag it",
                where=where,
                hint="the OOD fit degenerated (features that do not vary over validation images); export without an OOD "
                "score (export.ood=false) or train again",
            )
        worst = max(worst, float(np.max(np.abs(served - expected) / np.maximum(1.0, np.abs(expected)))))
    if worst > RELATIVE_TOLERANCE:
        raise PackageError(
            f"ONNX and PyTorch OOD scores disagree: max relative difference {worst:.2e} > {RELATIVE_TOLERANCE:.0e}",
            where=where,
            hint="try another opset (export.opset), or export without an OOD score (export.ood=false)",
        )
    return {"max_rel_diff": worst, "tolerance": RELATIVE_TOLERANCE, "images": len(images), "runtime": "onnxruntime CPU"}
