"""Augmentation of a whole batch at once, on the device that trains (`trainer.augment_on=device`).

Per-image MONAI transforms run in Python, one image at a time, on the CPU: at a few thousand
images per second they, not the GPU, set the pace. Here one random affine per image is drawn in
one go and applied to the batch with a single `affine_grid` + `grid_sample`; intensity jitter and
noise are batched tensor operations too. Same knobs as `data.augment` (each part applied to an
image with probability `prob`), no vertical flip (anatomy), horizontal flip only when
`data.augment.hflip` asks for it. Draws come from the augmenter's own generator, reseeded from
(seed, epoch), so a resumed or repeated run sees the same augmentation; under torchrun each rank passes a seed of its
own (medtriage.training.distributed.rank_seed), so the shards of one batch are not augmented alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medtriage.data.torch.datasets import gamma_range, train_transforms
from medtriage.optional import optional_import

stain_augment = optional_import("medtriage.data.torch.stain_augment")  # imports MONAI

# Columns of the per-image random draws (one [B, N_DRAWS] tensor per batch).
APPLY_AFFINE, ANGLE, SCALE, SHIFT_X, SHIFT_Y, FLIP, APPLY_GAIN, GAIN, APPLY_OFFSET, OFFSET, APPLY_NOISE, NOISE_STD = range(12)
N_DRAWS = 12


class BatchAugment:
    """`augment(images)` -> augmented copy of a float batch `[B, C, H, W]` in [0, 1] (clamped back to it)."""

    def __init__(self, augment, device: torch.device | str, seed: int = 0):
        self.settings, self.device, self.seed = augment, torch.device(device), seed
        self.generator = torch.Generator(device=self.device)
        self.reseed(0)

    def reseed(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch + 7)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.settings.enabled or images.numel() == 0:
            return images
        draws = torch.rand(images.shape[0], N_DRAWS, generator=self.generator, device=images.device)
        p = self.settings.prob
        images = self._affine(images, draws, p)
        images = self._intensity(images, draws, p)
        return images.clamp_(0.0, 1.0)  # decoded pixels live in [0, 1]; the served model never sees more

    def _affine(self, images: torch.Tensor, draws: torch.Tensor, p: float) -> torch.Tensor:
        s = self.settings
        apply = (draws[:, APPLY_AFFINE] < p).float()
        angle = _symmetric(draws[:, ANGLE], math.radians(s.rotate_deg)) * apply
        scale = 1 + _symmetric(draws[:, SCALE], s.scale) * apply
        shift = (
            torch.stack(
                [
                    _symmetric(draws[:, SHIFT_X], 2 * s.translate),  # affine_grid spans [-1, 1]: side = 2
                    _symmetric(draws[:, SHIFT_Y], 2 * s.translate),
                ],
                dim=1,
            )
            * apply[:, None]
        )
        hflip = getattr(s, "hflip", False)
        if p <= 0 and not hflip:  # decided from the settings: testing the draws would make the GPU wait
            return images
        flip = torch.where(draws[:, FLIP] < 0.5, -1.0, 1.0) if hflip else torch.ones_like(angle)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input coordinates: zoom in when scale > 1
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, shift[:, 0]], dim=1), torch.stack([sin * flip, cos, shift[:, 1]], dim=1)], dim=1
        )
        grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _intensity(self, images: torch.Tensor, draws: torch.Tensor, p: float) -> torch.Tensor:
        s = self.settings
        per_image = (images.shape[0], 1, 1, 1)
        if getattr(s, "gamma", 0.0) > 0:  # drawn only when on, so runs without it keep their draws
            images = self._tone_curve(images, p)
        gain = 1 + _symmetric(draws[:, GAIN], s.intensity_scale) * (draws[:, APPLY_GAIN] < p)
        offset = _symmetric(draws[:, OFFSET], s.intensity_shift) * (draws[:, APPLY_OFFSET] < p)
        images = images * gain.view(per_image) + offset.view(per_image)
        noise_std = s.noise_std * draws[:, NOISE_STD] * (draws[:, APPLY_NOISE] < p)  # std drawn in [0, noise_std], as MONAI
        if s.noise_std > 0:
            noise = torch.randn(images.shape, generator=self.generator, device=images.device, dtype=images.dtype)
            images = images + noise * noise_std.view(per_image)
        return images

    def _tone_curve(self, images: torch.Tensor, p: float) -> torch.Tensor:
        """Each image rescaled to [0, 1] by its own min and max, raised to a power drawn in `gamma_range`, and scaled
        back: MONAI RandAdjustContrast, batched, with the power drawn log-uniformly (MONAI draws it uniformly)."""
        apply, power = torch.rand(2, images.shape[0], generator=self.generator, device=images.device)
        low, high = (math.log(g) for g in gamma_range(self.settings.gamma))
        gamma = torch.where(apply < p, torch.exp(low + (high - low) * power), torch.ones_like(power)).view(-1, 1, 1, 1)
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        span = (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-7)
        return ((images - lo) / span).pow(gamma.to(images.dtype)) * span + lo


def _symmetric(uniform01: torch.Tensor, half_range: float) -> torch.Tensor:
    """U(0, 1) draws -> U(-half_range, half_range)."""
    return (2 * uniform01 - 1) * half_range


def loader_transforms(augment, size: int, on_device: bool):
    """Per-image transforms left for the loader: all of them (CPU), or only H&E stain jitter (device).

    None when nothing is left per image, so batches can be gathered straight from the cache.
    """
    if not on_device:
        return train_transforms(augment, size)
    if not augment.enabled or not (getattr(augment, "stain_sigma", 0.0) or getattr(augment, "stain_bias", 0.0)):
        return None
    return stain_augment.RandStainAugment(augment.stain_sigma, augment.stain_bias)
