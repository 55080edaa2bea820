"""Stored values -> display-ready float pixels in [0, 1] (numpy + pydicom only).

Order of operations follows the DICOM grayscale pipeline (PS3.4 N.2): stored values -> modality LUT
(rescale slope/intercept or a Modality LUT Sequence) -> VOI (VOI LUT Sequence, else window
center/width) -> [0, 1] -> Presentation LUT: a Presentation LUT Sequence's table (which wins over a Presentation LUT
Shape, and whose P-Values are never inverted again for MONOCHROME1: see `_presentation_lut`), else inverted where the
Presentation LUT Shape is INVERSE or the image is MONOCHROME1 (one inversion, not two, where both: see `_inverted`), so
that bright means dense everywhere.
A lookup table scales by the bits its entries use where its LUT Descriptor overstates them (see `_lut_bits`).
Without any VOI the values are scaled by the range the stored bits can hold (through the modality
LUT), never by the image's own min/max: the same scanner setting always gives the same intensities.
Float Pixel Data holds real-world values with no stored range: a window applies as above; without one, each frame
is scaled by its own min/max (so a frame decoded alone comes out as it does within the whole image).
Enhanced multi-frame objects keep these attributes in functional groups; where they differ between frames,
each frame goes through the pipeline with its own. Colour images (RGB, YBR_*, PALETTE COLOR) come out as 3-channel RGB scaled by their bit depth.
Where the grayscale pipeline is one affine map and a clip (the usual case), it runs as such, in one
blocked pass (io.native_pixels).
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medtriage.errors import DicomError
from medtriage.io.decode_limits import number_of_frames
from medtriage.io.native_pixels import StoredValues, affine_to_unit


def to_display(
    stored: np.ndarray | StoredValues, ds: pydicom.Dataset, where: str, frame: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Display pixels `[F, C, H, W]`, and the mean of each frame where it came on the way (the affine grayscale
    mapping, in one blocked pass), else None. `frame` is the one frame `stored` holds, if it holds only one."""
    views = _frame_views(ds, frame, where)
    if views is not None:
        return _frame_by_frame(stored, views, where)
    stored = _only_stored_bits(stored, ds)
    if isinstance(stored, StoredValues):
        affine = _display_affine(ds, 8 * stored.values.dtype.itemsize)
        if affine is not None:
            return affine_to_unit(stored, *affine)
        stored = stored.corrected()
    return _general_to_display(stored, ds, where), None


def _only_stored_bits(stored: np.ndarray | StoredValues, ds: pydicom.Dataset) -> np.ndarray | StoredValues:
    """Integer samples whose bits above Bits Stored count for nothing (PS3.5 8.1.1): cleared (unsigned) or filled with
    the sign (signed) on the way to display. pydicom does so for native, RLE and JPEG data, not for JPEG-LS or
    JPEG 2000 (it only fixes the sign where the codestream's precision differs from Bits Stored), and a JPEG 2000
    frame decoded at a reduced level keeps the codestream's bits: left as they come, an overlay drawn in an unused
    high bit would turn the pixels under it white. Grayscale values come back as StoredValues (the bits are dropped
    block by block in the affine pass); colour samples are corrected here."""
    if isinstance(stored, StoredValues):
        bits = _stored_bits(ds, stored.bits_stored)
        return StoredValues(stored.values, bits, stored.resolution_level)
    if stored.dtype.kind not in "iu":
        return stored
    values = StoredValues(stored, _stored_bits(ds, 8 * stored.dtype.itemsize))
    if stored.ndim == 3:
        return values
    return values.corrected() if values.unused_bits else stored


def _stored_bits(ds: pydicom.Dataset, known: int) -> int:
    """Bits Stored where the header gives fewer than `known` (the bits the values are known to hold), else `known`."""
    bits = int(ds.get("BitsStored") or known)
    return bits if 0 < bits < known else known


def _display_affine(ds: pydicom.Dataset, allocated: int) -> tuple[float, float] | None:
    """(scale, offset) such that display = clip(stored * scale + offset, 0, 1) gives what _general_to_display does for a
    grayscale image (rescale, then a LINEAR / LINEAR_EXACT window or the stored range, inverted as `_inverted` says);
    None where the mapping is not affine (lookup tables, SIGMOID, a window one value wide)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    if _has_presentation_lut(ds):  # a lookup table too, applied (or refused) by _general_to_display
        return None
    slope, intercept, (low, high) = _rescale(ds, allocated)
    window = _window_values(ds)
    if window is None:
        span = max(high - low, 1e-12)
        scale, offset = slope / span, (intercept - low) / span
    else:
        center, width, function = window
        if function == "SIGMOID" or (function != "LINEAR_EXACT" and width <= 1):
            return None
        span, start = (width, center) if function == "LINEAR_EXACT" else (width - 1, center - 0.5)
        scale, offset = slope / span, (intercept - start) / span + 0.5
    return (-scale, 1.0 - offset) if _inverted(ds) else (scale, offset)


def _general_to_display(stored: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _palette_to_rgb(stored, ds, where)
    if stored.ndim == 4:
        return _colour_to_unit(stored, int(ds.get("BitsStored") or 8 * stored.dtype.itemsize))
    pixels = _grayscale_to_unit(stored, ds, where)
    if _has_presentation_lut(ds):
        # Its entries are P-Values (PS3.3 C.11.6.1.1), the lowest shown black whatever the Photometric Interpretation
        # (PS3.4 N.2.1.4 note 1; DCMTK's DiMonoImage likewise): MONOCHROME1 is not inverted again.
        pixels = _presentation_lut(pixels, ds, where)
    elif _inverted(ds):
        np.subtract(1.0, pixels, out=pixels)
    return pixels[:, None]


def _inverted(ds: pydicom.Dataset) -> bool:
    """Whether the grayscale output is inverted after VOI: Presentation LUT Shape INVERSE (PS3.3 C.11.6.1: output =
    max - input), or MONOCHROME1 (its minimum shows white, PS3.3 C.7.6.3.1.2). Where both are given they are the same
    inversion, not two: the DX Image Module (PS3.3 C.8.11.3) requires INVERSE with MONOCHROME1 and IDENTITY with
    MONOCHROME2, the shape stating the inversion the Photometric Interpretation implies. An IDENTITY shape on
    MONOCHROME1 (not valid there) leaves it inverted, as MONOCHROME1 alone is. Not asked where a Presentation LUT
    Sequence gives the P-Values (see `_presentation_lut`)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def _has_presentation_lut(ds: pydicom.Dataset) -> bool:
    """Whether the image carries a Presentation LUT Sequence, even an empty one (which `_presentation_lut` refuses)."""
    return "PresentationLUTSequence" in ds


def _presentation_lut(pixels: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    """VOI output in [0, 1] through the Presentation LUT Sequence's table, to P-Values scaled by the bits its entries
    use. PS3.3 C.11.6.1 scales the VOI output range linearly onto the table's input range: 0 takes the first entry, 1
    the last (the first value mapped, fixed at 0 by C.11.6.1.1, does not move them). The table wins over a
    Presentation LUT Shape sent with it (C.11.6 makes them alternatives; a writer sending both has often added the
    shape an image module requires), as in pydicom's apply_presentation_lut. That helper is not used: it scales by
    the image's own min/max and reads OW entries in this machine's byte order."""
    try:
        table, bits = _presentation_table(ds)
    except Exception as err:
        raise DicomError(
            f"invalid Presentation LUT Sequence: {err}",
            where=where,
            hint="fix or remove the Presentation LUT in the source system (a Presentation LUT Shape may replace it)",
        ) from err
    np.clip(pixels, 0.0, 1.0, out=pixels)  # a VOI LUT whose entries exceed its stated bits gives more than 1
    pixels *= np.float32(len(table) - 1)
    index = np.rint(pixels, out=pixels).astype(np.uint16)  # at most 2^16 entries
    return table[index] * np.float32(1.0 / (2.0**bits - 1))


def _presentation_table(ds: pydicom.Dataset) -> tuple[np.ndarray, int]:
    """The Presentation LUT's entries as float32 and the bits they are scaled by."""
    items = ds.PresentationLUTSequence
    if len(items) != 1:  # PS3.3 C.11.6: exactly one item
        raise ValueError(f"{len(items)} items, exactly one is allowed")
    table, _, bits = _display_table(items[0], ds)
    return table, bits


def _colour_to_unit(rgb: np.ndarray, bits: int) -> np.ndarray:
    pixels = np.ascontiguousarray(rgb.transpose(0, 3, 1, 2), dtype=np.float32)
    if rgb.dtype.kind == "f":
        return _min_max(pixels)
    pixels *= np.float32(1.0 / (2.0**bits - 1))
    return pixels


def _palette_to_rgb(stored: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    try:
        rgb = apply_color_lut(stored, _palette_in_native_order(ds))
    except Exception as err:
        raise DicomError(f"cannot apply the palette colour lookup table: {err}", where=where) from err
    return _colour_to_unit(rgb, 8 * rgb.dtype.itemsize)


PALETTE_DESCRIPTORS = tuple(f"{colour}PaletteColorLookupTableDescriptor" for colour in ("Red", "Green", "Blue"))
PALETTE_DATA = tuple(f"{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue", "Alpha"))


def _palette_in_native_order(ds: pydicom.Dataset) -> pydicom.Dataset:
    """pydicom reads 16-bit palette entries (not segmented) in this machine's byte order, whatever the data set's: a
    big-endian file's palette came out near black. Such a palette is handed over in native order, on a copy."""
    if ds.original_encoding[1] is not False or PALETTE_DATA[0] not in ds:
        return ds
    entries = int(ds[PALETTE_DESCRIPTORS[0]].value[0]) or 2**16
    palette = pydicom.Dataset()
    for keyword in ("PixelPresentation", *PALETTE_DESCRIPTORS, *PALETTE_DATA):  # what apply_color_lut reads
        if keyword in ds:
            value = ds[keyword].value
            wide = isinstance(value, bytes) and keyword in PALETTE_DATA and len(value) == 2 * entries
            setattr(palette, keyword, np.frombuffer(value, ">u2").astype("=u2").tobytes() if wide else value)
    return palette


def _grayscale_to_unit(stored: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    if stored.dtype.kind == "f":  # Float Pixel Data: real-world values without a stored range
        window, values = _window_values(ds), stored.astype(np.float32)
        if window is None:
            return _min_max(values)
        if not np.isfinite(values).all():  # NaN would pass through the window to the model
            raise ValueError("float pixel data holds NaN or infinite values")
        return _apply_window(values, *window)
    values, value_range = _modality(stored, ds)
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds, where)
    window = _window_values(ds)
    if window is not None:
        return _apply_window(values, *window)
    low, high = value_range
    values -= low
    values *= 1.0 / max(high - low, 1e-12)
    return np.clip(values, 0.0, 1.0, out=values)


def _modality(stored: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality LUT output as float32 (a fresh array, safe to modify) and the range it can span."""
    if ds.get("ModalityLUTSequence"):
        table, _, stated = _lut_table(ds.ModalityLUTSequence[0], ds)
        bits = _lut_bits(stated, table)
        return apply_modality_lut(stored, ds).astype(np.float32), (0.0, 2.0**bits - 1)
    slope, intercept, value_range = _rescale(ds, stored.dtype.itemsize * 8)
    values = stored.astype(np.float32)
    if (slope, intercept) != (1.0, 0.0):
        values *= slope
        values += intercept
    return values, value_range


def _rescale(ds: pydicom.Dataset, allocated: int) -> tuple[float, float, tuple[float, float]]:
    """Rescale slope and intercept, and the range of modality values the stored bits can hold."""
    bits = int(ds.get("BitsStored") or allocated)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)
    slope = _header_number(ds, "RescaleSlope", "Rescale Slope", 1.0)
    if slope == 0.0:  # every pixel would map to the intercept: what the stored values mean is lost
        raise ValueError("Rescale Slope is 0, so the real-world values of the pixels are unknown")
    intercept = _header_number(ds, "RescaleIntercept", "Rescale Intercept", 0.0)
    if (slope, intercept) != (1.0, 0.0):
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return slope, intercept, (low, high)


def _header_number(ds: pydicom.Dataset, keyword: str, name: str, default: float) -> float:
    """A number the header may leave out (absent or empty: `default`); a zero it states stays zero."""
    value = _attribute(ds, keyword)
    return default if value is None or value == "" else _finite(value, name)


def _voi_lut(values: np.ndarray, ds: pydicom.Dataset, where: str) -> np.ndarray:
    """VOI LUT Sequence: look up the (integer) modality values, scale by the LUT's bit depth. Not by pydicom's
    apply_voi: it computes the indices in the type of the entries, so a table of 8-bit entries longer than 256 (an
    8-bit output for 12-bit values, PS3.3 C.11.2.1.1) wraps every index past 255."""
    try:
        table, first, bits = _voi_table(ds)
    except Exception as err:
        raise DicomError(f"invalid VOI LUT Sequence: {err}", where=where, hint="fix or remove the VOI LUT in the source system") from err
    index = np.clip(np.rint(values) - first, 0, len(table) - 1).astype(np.intp)  # outside the table: its end entries
    return table[index] * np.float32(1.0 / (2.0**bits - 1))


def _voi_table(ds: pydicom.Dataset) -> tuple[np.ndarray, int, int]:
    """The first VOI LUT's entries as float32, the first value it maps and the bits its entries are scaled by."""
    return _display_table(ds.VOILUTSequence[0], ds)


def _display_table(item: pydicom.Dataset, ds: pydicom.Dataset) -> tuple[np.ndarray, int, int]:
    """A VOI or Presentation LUT item's entries as float32, the first value it maps and the bits its entries are
    scaled by. PS3.3 C.11.2.1.1 allows 8 or 10 to 16 bits per entry for a VOI LUT; C.11.6.1.1 10 to 16 for a
    Presentation LUT, whose 8 is taken too (scaled as stated, it cannot mislead)."""
    table, first, bits = _lut_table(item, ds)
    if not (bits == 8 or 10 <= bits <= 16):
        raise ValueError(f"{bits} bits per LUT entry (LUT Descriptor); 8 or 10 to 16 are allowed")
    return table, first, _lut_bits(bits, table)


LUT_DEPTHS_USED = (8, 12)  # the entry depths writers use when they state 16 (or another depth above these)


def _lut_bits(stated: int, table: np.ndarray) -> int:
    """The bits a LUT's entries are scaled by: the LUT Descriptor's, unless it states more than 8 or 12 and every
    entry fits in 8 or 12 bits (then the narrower). Some writers state 16 bits for 8- or 12-bit entries (PS3.3
    C.11.1.1 notes 8-bit entries written in 16-bit words); scaled by 2^16 - 1, such a LUT's image shows near black.
    pydicom's apply_voi_lut and apply_modality_lut return the raw entries and leave the scaling to the caller (its
    apply_color_lut takes the entries' width from the data, not the descriptor); DCMTK, where told not to trust the
    descriptor, scales by the bits the largest entry needs (DiLookupTable::checkBits). Only the usual depths are
    taken, so a LUT that leaves just its top bit or two unused keeps the depth it states."""
    largest = int(table.max()) if len(table) else 0
    return next((depth for depth in LUT_DEPTHS_USED if depth < stated and largest < 2**depth), stated)


def _lut_table(item: pydicom.Dataset, ds: pydicom.Dataset) -> tuple[np.ndarray, int, int]:
    """A Modality or VOI LUT item's entries as float32, the first value it maps and its stated bits per entry."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the data set's byte order
        data = np.frombuffer(data, ">u2" if ds.original_encoding[1] is False else "<u2")
    table = np.asarray(data, dtype=np.float32).ravel()
    if len(table) < entries:
        raise ValueError(f"LUT Data holds {len(table)} entries, the LUT Descriptor claims {entries}")
    return table[:entries], first, bits


def _window_values(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """The first window (center, width) the header gives in full with a positive width, and the VOI LUT function;
    None where there is none. PS3.3 C.11.2.1.2 wants a width > 0: a negative one would invert the image, a zero one
    (some writers' "unset") make it two-valued, and an empty value names nothing. Such a window is no window: viewers
    show images with only such windows unwindowed, and a later window in the list is another view of the same image."""
    function = str(_attribute(ds, "VOILUTFunction") or "LINEAR").upper()
    for center, width in zip(_listed(ds, "WindowCenter"), _listed(ds, "WindowWidth")):
        if center in (None, "") or width in (None, ""):
            continue
        width = _finite(width, "Window Width")
        if width > 0:
            return _finite(center, "Window Center"), width, function
    return None


def _listed(ds: pydicom.Dataset, keyword: str) -> list:
    value = _attribute(ds, keyword)
    if value is None:
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]


def _finite(value, name: str) -> float:
    """A header number as float: NaN or infinity would make every pixel NaN."""
    number = float(value)
    if not np.isfinite(number):
        raise ValueError(f"{name} is NaN or infinite ({value!r})")
    return number


# Enhanced multi-frame objects (Enhanced CT/MR/XA...) keep rescale and window in functional group macros, not at the top.
_FUNCTIONAL_MACROS = {
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
    "WindowCenter": "FrameVOILUTSequence",
    "WindowWidth": "FrameVOILUTSequence",
    "VOILUTFunction": "FrameVOILUTSequence",
}


def _attribute(ds: pydicom.Dataset, keyword: str):
    """A top-level attribute; else its value in the shared functional groups; else in the per-frame groups when every
    frame has the same value (`to_display` decodes frame by frame when they differ)."""
    value = ds.get(keyword)
    if value is not None:
        return value
    macro = _FUNCTIONAL_MACROS[keyword]
    for item in ds.get("SharedFunctionalGroupsSequence") or ():
        for values in item.get(macro) or ():
            if keyword in values:
                return values.get(keyword)
    per_frame = [
        next((values.get(keyword) for values in item.get(macro) or () if keyword in values), None)
        for item in ds.get("PerFrameFunctionalGroupsSequence") or ()
    ]
    if per_frame and all(str(v) == str(per_frame[0]) for v in per_frame):
        return per_frame[0]
    return None


def _frame_views(ds: pydicom.Dataset, frame: int | None, where: str) -> list[pydicom.Dataset] | None:
    """When an enhanced multi-frame image's rescale or window differ between frames: for each decoded frame, a
    dataset of the top-level attributes (no pixels, no functional groups) with that frame's values written at the top
    level; else None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or ()
    if len(per_frame) < 2:
        return None
    values = [_frame_values(ds, item) for item in per_frame]
    if all(v == values[0] for v in values):
        return None
    if len(per_frame) != number_of_frames(ds):  # frames without an item would be dropped, or mapped by a guess
        raise DicomError(
            f"the Per-frame Functional Groups Sequence has {len(per_frame)} items for {number_of_frames(ds)} frames,"
            " and its rescale or window values differ between frames",
            where=where,
            hint="the enhanced multi-frame header is damaged; export the image again from the source system",
        )
    kept = [ds[tag] for tag in ds.keys() if pydicom.datadict.keyword_for_tag(tag) not in _NOT_IN_FRAME_VIEWS]
    views = []
    for chosen in values if frame is None else [values[frame]]:
        view = pydicom.Dataset()  # its own element dictionary (a copy.copy would share one)
        for element in kept:
            view.add(element)
        for keyword, value in chosen.items():
            if keyword not in view:  # a top-level value holds for every frame: already there
                setattr(view, keyword, value)
        views.append(view)
    return views


_NOT_IN_FRAME_VIEWS = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
}


def _frame_values(ds: pydicom.Dataset, item: pydicom.Dataset) -> dict:
    """The rescale and window attributes that hold for one frame: top level, else the frame's groups, else shared."""
    found = {}
    for keyword, macro in _FUNCTIONAL_MACROS.items():
        sources = [
            ds,
            *(item.get(macro) or ()),
            *(m for shared in ds.get("SharedFunctionalGroupsSequence") or () for m in shared.get(macro) or ()),
        ]
        value = next((source.get(keyword) for source in sources if source.get(keyword) is not None), None)
        if value is not None:
            found[keyword] = value
    return found


def _frame_by_frame(stored: np.ndarray | StoredValues, views: list[pydicom.Dataset], where: str) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [to_display(_one_frame(stored, index), view, where) for index, view in enumerate(views)]
    means = [part_means for _, part_means in parts]
    pixels = np.concatenate([part_pixels for part_pixels, _ in parts])
    return pixels, None if any(m is None for m in means) else np.concatenate(means)


def _one_frame(stored: np.ndarray | StoredValues, index: int) -> np.ndarray | StoredValues:
    if isinstance(stored, StoredValues):
        return StoredValues(stored.values[index : index + 1], stored.bits_stored, stored.resolution_level)
    return stored[index : index + 1]


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3 windowing straight to [0, 1], in place on float32."""
    if function == "SIGMOID":
        values -= center
        values *= -4.0 / width
        np.exp(values, out=values)
        values += 1.0
        return np.reciprocal(values, out=values)
    if function == "LINEAR_EXACT":
        values -= center
        values *= 1.0 / width
    elif width <= 1:
        return (values > center - 0.5).astype(np.float32)
    else:
        values -= center - 0.5
        values *= 1.0 / (width - 1)
    values += 0.5
    return np.clip(values, 0.0, 1.0, out=values)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Float pixel data `[F, ...]`, each frame scaled by its own range, in place; NaN or infinity would spread to every
    pixel."""
    for frame in values:
        low, high = float(frame.min()), float(frame.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("float pixel data holds NaN or infinite values")
        frame -= low
        frame *= 1.0 / max(high - low, 1e-12)
    return values
