"""H&E stain normalisation (Macenko et al., ISBI 2009) and stain augmentation, numpy only.

Tiles follow the model's input contract: float32 `[3, H, W]` RGB in [0, 1]. Colour is turned into
optical density (OD = -ln(I / I0)); in OD space a pixel is a non-negative mix of a haematoxylin
and an eosin vector, so one site's stains can be re-expressed with a reference's stains.

Fit the source stains once per slide (`fit_stains` on a sample of its tissue tiles) and apply them
to every tile: steadier than per-tile fits, and only a matrix product per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtriage.errors import InputError

BACKGROUND_INTENSITY = 240.0 / 255.0  # I0: brightness of glass; brighter pixels read as zero stain
OD_THRESHOLD = 0.15  # pixels with less OD in any channel are background, not used for fitting
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angle distribution
MAX_PERCENTILE = 99.0
MIN_TISSUE_PIXELS = 100
MAX_FIT_PIXELS = 100_000  # percentiles are stable well below this; more only costs time


@dataclass(frozen=True)
class Stains:
    """Stain vectors (columns: haematoxylin, eosin; unit OD per RGB channel) and robust max concentrations."""

    matrix: np.ndarray  # [3, 2]
    max_concentrations: np.ndarray  # [2]

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.round(6).tolist(), "max_concentrations": self.max_concentrations.round(6).tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> "Stains":
        return cls(np.asarray(values["matrix"], np.float64), np.asarray(values["max_concentrations"], np.float64))


# The reference used in Macenko's published code: a typical, well-stained H&E slide.
REFERENCE_STAINS = Stains(
    matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_concentrations=np.array([1.9705, 1.0308]),
)


OD_TABLE = np.clip(-np.log(np.maximum(np.arange(256), 1) / 255.0 / BACKGROUND_INTENSITY), 0.0, None).astype(np.float32)


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """`[3, N]` RGB (uint8, or float in [0, 1]) -> OD `[3, N]` float64 (for the eigen decomposition)."""
    if pixels.dtype == np.uint8:
        return OD_TABLE[pixels].astype(np.float64)
    rgb = pixels.astype(np.float64)
    return np.clip(-np.log(np.clip(rgb, 1.0 / 255.0, None) / BACKGROUND_INTENSITY), 0.0, None)


def _channel_rows(tile: np.ndarray) -> np.ndarray:
    """`[3, N]` view of a tile: uint8 tiles are `[H, W, 3]` as read, float tiles `[3, H, W]` as served."""
    return np.moveaxis(tile, -1, 0).reshape(3, -1) if tile.dtype == np.uint8 else tile.reshape(3, -1)


def fit_stains(pixels: np.ndarray | list[np.ndarray], where: str | None = None) -> Stains:
    """Macenko: the plane of the two largest OD eigenvectors, extreme angles in it = the two stains.

    `pixels`: one tile or a list (uint8 `[H, W, 3]` or float32 `[3, H, W]`), e.g. a sample of a slide's tiles.
    """
    tiles = pixels if isinstance(pixels, list) else [pixels]
    rows = np.concatenate([_channel_rows(t) for t in tiles], axis=1)
    od = optical_density(rows[:, :: max(1, rows.shape[1] // MAX_FIT_PIXELS)])
    tissue = od[:, np.all(od > OD_THRESHOLD, axis=0)]
    if tissue.shape[1] < MIN_TISSUE_PIXELS:
        raise InputError(
            f"too little stained tissue to fit stains ({tissue.shape[1]} pixels)", where=where,
            hint="fit on tiles that contain tissue, or use the reference stains",
        )
    _, eigvecs = np.linalg.eigh(np.cov(tissue))
    plane = eigvecs[:, 1:3]  # eigh sorts ascending: the two largest
    plane = plane * np.where(plane[0] < 0, -1, 1)  # point both into positive OD
    projected = plane.T @ tissue
    angles = np.arctan2(projected[1], projected[0])
    low, high = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin absorbs red more than eosin does: it goes first.
    matrix = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low], axis=1)
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=0)
    concentrations = np.linalg.pinv(matrix) @ tissue
    return Stains(matrix, np.percentile(concentrations, MAX_PERCENTILE, axis=1))


class StainNormalizer:
    """Re-expresses tiles stained like `source` with the `target` stains (Macenko)."""

    def __init__(self, source: Stains, target: Stains = REFERENCE_STAINS):
        self.source, self.target = source, target
        scale = target.max_concentrations / np.maximum(source.max_concentrations, 1e-6)
        self._unmix = np.linalg.pinv(source.matrix).astype(np.float32)  # [2, 3]: OD -> concentrations
        self._remix = (target.matrix * scale).astype(np.float32)  # [3, 2]: rescaled concentrations -> OD

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """float32 `[3, H, W]` in [0, 1] -> the same, restained."""
        codes = np.rint(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
        return self._restain_codes(codes)

    def from_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 `[H, W, 3]` as read from a slide -> restained float32 `[3, H, W]` in [0, 1]."""
        return self._restain_codes(np.moveaxis(rgb, -1, 0))

    def _restain_codes(self, codes: np.ndarray) -> np.ndarray:
        # Slides are 8-bit: a 256-entry table replaces a log per pixel.
        shape = codes.shape
        concentrations = self._unmix @ OD_TABLE[codes].reshape(3, -1)
        np.clip(concentrations, 0.0, None, out=concentrations)
        od = self._remix @ concentrations  # >= 0, so the result stays within [0, I0]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= BACKGROUND_INTENSITY
        return od.reshape(shape)


def normalize_tiles(tiles: list[np.ndarray], target: Stains = REFERENCE_STAINS, where: str | None = None) -> list[np.ndarray]:
    """Fit the source stains on all `tiles` together (one slide) and restain each of them."""
    normalizer = StainNormalizer(fit_stains(tiles, where=where), target)
    return [normalizer(tile) for tile in tiles]


# Ruifrok & Johnston's H, E, DAB OD vectors (rows): a fixed, fit-free decomposition for augmentation.
HED_FROM_RGB_OD = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))
RGB_OD_FROM_HED = np.linalg.inv(HED_FROM_RGB_OD)


def augment_stain(tile: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Random stain jitter (Tellez et al. 2018): scale and shift H and E concentrations per tile."""
    od = -np.log(np.clip(tile.reshape(3, -1).astype(np.float32), 1.0 / 255.0, 1.0))
    hed = HED_FROM_RGB_OD.T.astype(np.float32) @ od
    alpha = np.ones(3, np.float32)
    beta = np.zeros(3, np.float32)
    alpha[:2] = rng.uniform(1 - sigma, 1 + sigma, 2)
    beta[:2] = rng.uniform(-bias, bias, 2)
    hed = hed * alpha[:, None] + beta[:, None]
    out = np.exp(-(RGB_OD_FROM_HED.T.astype(np.float32) @ hed))
    return np.clip(out, 0.0, 1.0).reshape(tile.shape).astype(np.float32)
