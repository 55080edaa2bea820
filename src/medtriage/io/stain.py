"""H&E stain normalisation (Macenko et al., ISBI 2009) and stain augmentation, numpy only.

Tiles follow the model's input contract: float32 `[3, H, W]` RGB in [0, 1]. Colour is turned into
optical density (OD = -ln(I / I0)); in OD space a pixel is a non-negative mix of a haematoxylin
and an eosin vector, so one site's stains can be re-expressed with a reference's stains.

Fit the source stains once per slide (`fit_stains` on a sample of its tissue tiles) and apply them
to every tile: steadier than per-tile fits, and only a matrix product per tile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from medtriage.errors import InputError

BACKGROUND_INTENSITY = 240.0 / 255.0  # I0: brightness of glass; brighter pixels read as zero stain
OD_THRESHOLD = 0.15  # pixels with a shorter OD vector are background, not used for fitting
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angle distribution
MAX_PERCENTILE = 99.0
MIN_TISSUE_PIXELS = 100
MIN_STAIN_ANGLE_DEGREES = 5.0  # the reference H&E stains are 22° apart; fits closer than this saw a single colour
MAX_FIT_PIXELS = 100_000  # percentiles are stable well below this; more only costs time
RESTAIN_CHUNK = 16_384  # pixels restained at a time: the temporaries stay in the CPU cache


@dataclass(frozen=True)
class Stains:
    """Stain vectors (columns: haematoxylin, eosin; unit OD per RGB channel) and robust max concentrations."""

    matrix: np.ndarray  # [3, 2]
    max_concentrations: np.ndarray  # [2]

    def to_dict(self) -> dict:
        return {"matrix": self.matrix.round(6).tolist(), "max_concentrations": self.max_concentrations.round(6).tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> Stains:
        return cls(np.asarray(values["matrix"], np.float64), np.asarray(values["max_concentrations"], np.float64))


# The reference used in Macenko's published code: a typical, well-stained H&E slide.
REFERENCE_STAINS = Stains(
    matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]),
    max_concentrations=np.array([1.9705, 1.0308]),
)


OD_TABLE = np.clip(-np.log(np.maximum(np.arange(256), 1) / 255.0 / BACKGROUND_INTENSITY), 0.0, None).astype(np.float32)


def optical_density(pixels: np.ndarray) -> np.ndarray:
    """`[3, N]` RGB (uint8, or float in [0, 1]) -> OD `[3, N]` float32."""
    if pixels.dtype == np.uint8:
        return OD_TABLE[pixels]
    rgb = pixels.astype(np.float64)
    return np.clip(-np.log(np.clip(rgb, 1.0 / 255.0, None) / BACKGROUND_INTENSITY), 0.0, None).astype(np.float32)


def _sample_pixels(tiles: list[np.ndarray]) -> np.ndarray:
    """`[3, n]`: every k-th pixel of the tiles taken as one sequence, k chosen so n <= about MAX_FIT_PIXELS.

    Each tile is strided on its own (no concatenation of whole tiles first): the same pixels, less copying.
    """
    counts = [t.size // 3 for t in tiles]
    stride = max(1, sum(counts) // MAX_FIT_PIXELS)
    rows, offset = [], 0
    for tile, count in zip(tiles, counts):
        start = -offset % stride  # continue the stride across tile boundaries
        if tile.dtype == np.uint8:  # [H, W, 3] as read
            rows.append(tile.reshape(-1, 3)[start::stride].T)
        else:  # [3, H, W] as served
            rows.append(tile.reshape(3, -1)[:, start::stride])
        offset += count
    return np.concatenate(rows, axis=1)


def _stained_od(pixels: np.ndarray) -> np.ndarray:
    """OD `[3, m]` float32 of the pixels `[3, n]` whose OD vector is longer than OD_THRESHOLD.

    The length, not every channel: eosin barely absorbs red, so pale stroma has almost no red OD
    and an every-channel threshold would drop all pure-eosin pixels, biasing the fitted eosin
    vector towards haematoxylin.
    """
    od = optical_density(pixels)
    # compress keeps rows contiguous (a boolean index here returns a column-major copy, slow to reduce along)
    return od.compress(np.einsum("ij,ij->j", od, od) > np.float32(OD_THRESHOLD**2), axis=1)


def fit_stains(pixels: np.ndarray | list[np.ndarray], where: str | None = None) -> Stains:
    """Macenko: the plane of the two largest OD eigenvectors, extreme angles in it = the two stains.

    `pixels`: one tile or a list (uint8 `[H, W, 3]` or float32 `[3, H, W]`), e.g. a sample of a slide's tiles.
    Per-pixel work is float32 (the same stains as float64 to about 1e-6); the 3x3 and 3x2 algebra is float64.
    """
    tissue = _stained_od(_sample_pixels(pixels if isinstance(pixels, list) else [pixels]))
    if tissue.shape[1] < MIN_TISSUE_PIXELS:
        raise InputError(
            f"too little stained tissue to fit stains ({tissue.shape[1]} pixels)",
            where=where,
            hint="fit on tiles that contain tissue, or use the reference stains",
        )
    mean = tissue.mean(axis=1, keepdims=True)
    centred = tissue - mean
    covariance = (centred @ centred.T).astype(np.float64) / (tissue.shape[1] - 1)  # np.cov without its copies
    _, eigvecs = np.linalg.eigh(covariance)
    plane = eigvecs[:, 1:3]  # eigh sorts ascending: the two largest
    # Point both towards the tissue's mean OD, so its angles stay clear of ±π instead of wrapping there. The sign of
    # the red component (Macenko's code) can flip an eosin-like vector, which barely absorbs red, away from the tissue.
    plane = plane * np.where(mean[:, 0].astype(np.float64) @ plane < 0, -1, 1)
    projected = plane.T.astype(np.float32) @ tissue
    angles = np.arctan2(projected[1], projected[0])
    low, high = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v_low = plane @ np.array([np.cos(low), np.sin(low)])
    v_high = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin absorbs red more than eosin does: it goes first.
    matrix = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low], axis=1)
    matrix = np.abs(matrix) / np.linalg.norm(matrix, axis=0)
    _refuse_single_colour(matrix, tissue.shape[1], where)
    concentrations = np.linalg.pinv(matrix).astype(np.float32) @ tissue
    return Stains(matrix, np.percentile(concentrations, MAX_PERCENTILE, axis=1).astype(np.float64))


def stain_angle_degrees(matrix: np.ndarray) -> float:
    """Angle between the two unit stain vectors (columns of `matrix`)."""
    return float(np.degrees(np.arccos(np.clip(matrix[:, 0] @ matrix[:, 1], -1.0, 1.0))))


def _refuse_single_colour(matrix: np.ndarray, n_pixels: int, where: str | None) -> None:
    """A sample of one flat colour has no second stain: both fitted vectors come out (nearly) the same, and
    unmixing with them turns every tile into meaningless colours."""
    angle = stain_angle_degrees(matrix)
    if angle < MIN_STAIN_ANGLE_DEGREES:
        raise InputError(
            f"degenerate stain fit: the haematoxylin {matrix[:, 0].round(3).tolist()} and eosin "
            f"{matrix[:, 1].round(3).tolist()} vectors fitted on {n_pixels} stained pixels are {angle:.1f}° apart "
            f"(at least {MIN_STAIN_ANGLE_DEGREES:g}° needed): the sample shows a single colour, not two stains",
            where=where,
            hint="fit on tiles that show stained tissue (nuclei and stroma), or turn stain normalisation off",
        )


class StainNormalizer:
    """Re-expresses tiles stained like `source` with the `target` stains (Macenko).

    Per pixel: OD from a 256-entry table, concentrations = unmix @ OD (clipped at 0), then
    I0 * exp(-remix @ concentrations), all in float32 into reused buffers (one set per thread),
    writing straight into the caller's output.
    """

    def __init__(self, source: Stains, target: Stains = REFERENCE_STAINS):
        self.source, self.target = source, target
        scale = target.max_concentrations / np.maximum(source.max_concentrations, 1e-6)
        self._unmix = np.linalg.pinv(source.matrix).astype(np.float32)  # [2, 3]: OD -> concentrations
        self._remix = (-target.matrix * scale).astype(np.float32)  # [3, 2]: concentrations -> minus OD
        self._scratch = threading.local()

    def __getstate__(self) -> dict:  # picklable for worker processes; buffers are rebuilt there
        return {k: v for k, v in vars(self).items() if k != "_scratch"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, _scratch=threading.local())

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        """float32 `[3, H, W]` in [0, 1] -> the same, restained."""
        codes = np.rint(np.clip(tile, 0.0, 1.0) * 255.0).astype(np.uint8)
        out = np.empty(tile.shape, np.float32)
        self._restain(codes.reshape(3, -1), out.reshape(3, -1))
        return out

    def from_rgb(self, rgb: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 `[H, W, 3]` as read from a slide -> restained float32 `[3, H, W]` in [0, 1] (into `out` if given)."""
        h, w, _ = rgb.shape
        out = np.empty((3, h, w), np.float32) if out is None else out
        if not out.flags.c_contiguous:
            raise ValueError("restained tiles are written into a C-contiguous float32 [3, H, W] array")
        self._restain(rgb.transpose(2, 0, 1).reshape(3, -1), out.reshape(3, -1))
        return out

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scratch = self._scratch
        if not hasattr(scratch, "od"):  # fresh temporaries per tile would cost page faults
            scratch.od = np.empty((3, RESTAIN_CHUNK), np.float32)
            scratch.conc = np.empty((2, RESTAIN_CHUNK), np.float32)
            scratch.zeros = np.zeros((2, RESTAIN_CHUNK), np.float32)  # np.maximum is SIMD against an array, not a scalar
        return scratch.od, scratch.conc, scratch.zeros

    def _restain(self, codes: np.ndarray, out: np.ndarray) -> None:
        """uint8 codes `[3, N]` -> restained float32 `[3, N]`, in chunks small enough to stay in cache."""
        od_buffer, conc_buffer, zeros = self._buffers()
        for start in range(0, codes.shape[1], RESTAIN_CHUNK):
            chunk = out[:, start : start + RESTAIN_CHUNK]
            n = chunk.shape[1]
            od, conc = od_buffer[:, :n], conc_buffer[:, :n]
            np.take(OD_TABLE, codes[:, start : start + RESTAIN_CHUNK], out=od, mode="clip")  # uint8: always in range
            np.matmul(self._unmix, od, out=conc)
            np.maximum(conc, zeros[:, :n], out=conc)
            np.matmul(self._remix, conc, out=chunk)  # <= 0, so the result stays within [0, I0]
            np.exp(chunk, out=chunk)
            chunk *= BACKGROUND_INTENSITY


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
