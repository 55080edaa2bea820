"""Stain augmentation of RGB tiles during training, as a MONAI transform around medtriage.io.stain.

Each tile's haematoxylin and eosin amounts are scaled and shifted at random (Tellez et al. 2018),
so a network sees many staining protocols and cannot rely on one site's colours. Being a MONAI
Randomizable, it is seeded by the training loader like the other transforms: runs repeat exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import RandomizableTransform

from medtriage.errors import ConfigError
from medtriage.io.stain import augment_stain


class RandStainAugment(RandomizableTransform):
    """float32 `[3, H, W]` RGB tile in [0, 1] -> the same tile with jittered H&E stain amounts."""

    def __init__(self, sigma: float, bias: float, prob: float = 1.0):
        super().__init__(prob)
        if sigma < 0 or bias < 0:
            raise ConfigError(f"stain augmentation needs sigma, bias >= 0 (got {sigma}, {bias})", where="data.augment.stain_sigma")
        self.sigma, self.bias = sigma, bias

    def __call__(self, image):
        self.randomize(None)
        if not self._do_transform:
            return image
        pixels = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ConfigError(
                f"stain augmentation works on RGB tiles [3, H, W], got shape {list(pixels.shape)}",
                where="data.augment.stain_sigma",
                hint="set it to 0 for grey-level images",
            )
        # augment_stain only calls .uniform, which MONAI's RandomState offers too.
        return torch.from_numpy(augment_stain(pixels, self.R, self.sigma, self.bias))
