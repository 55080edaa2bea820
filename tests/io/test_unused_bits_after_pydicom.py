"""Only the Bits Stored low bits of a sample are its value (PS3.5 8.1.1), whichever decoder reads it: pydicom clears
the bits above for native, RLE and JPEG data but leaves them in JPEG-LS and JPEG 2000 data whose codestream holds
more bits, so an overlay drawn in an unused high bit must not reach the display through those either."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from medtriage.io.dicom import read_dicom
from tests.io.test_fallback_decoder_scope import reread, unsigned_10_bit_with_a_high_bit_set
from tests.io.test_pixel_values_from_headers import encoded, signed_12_bit_ct

imagecodecs = pytest.importorskip("imagecodecs")


def jpegls(samples: np.ndarray) -> bytes:
    return bytes(imagecodecs.jpegls_encode(samples))  # precision 16: the high bits travel with the samples


def jpeg2000(samples: np.ndarray) -> bytes:
    return bytes(imagecodecs.jpeg2k_encode(samples, level=0, codecformat="j2k", reversible=True, mct=False))


ENCODERS = {"jpeg-ls": (JPEGLSLossless, jpegls), "jpeg-2000": (JPEG2000Lossless, jpeg2000)}


def with_pixels(ds: pydicom.Dataset, samples: np.ndarray, tmp_path, name: str, codec: str | None = None):
    """`ds` with `samples` as its pixel data, uncompressed or through `codec`, written to a file."""
    copy = reread(ds)
    if codec is None:
        copy.PixelData = samples.tobytes()
    else:
        syntax, encode = ENCODERS[codec]
        copy.PixelData = encapsulate([encode(samples)])
        copy.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(encoded(copy))
    return path


@pytest.mark.parametrize("codec", sorted(ENCODERS))
def test_an_unused_high_bit_does_not_whiten_unsigned_pixels(codec, tmp_path):
    ds, samples = unsigned_10_bit_with_a_high_bit_set()  # values 100..900 in 10 bits, bit 11 set in every pixel
    expected = read_dicom(with_pixels(ds, samples, tmp_path, "native")).pixels
    assert expected.max() < 0.9  # uncompressed: the stored bits are read, nothing saturates
    got = read_dicom(with_pixels(ds, samples, tmp_path, codec, codec)).pixels
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("codec", "signed_codestream"),
    [("jpeg-ls", False), ("jpeg-2000", False), ("jpeg-2000", True)],  # JPEG-LS has no signed samples
    ids=["jpeg-ls", "jpeg-2000-unsigned-codestream", "jpeg-2000-signed-codestream"],
)
def test_signed_pixels_take_their_sign_from_the_highest_stored_bit(codec, signed_codestream, tmp_path):
    ds = signed_12_bit_ct()  # -896..1167 HU in 12 bits
    hounsfield = ds.pixel_array.astype(np.int16)
    carried = (hounsfield & 0xFFF).astype(np.uint16) | 0x4000  # 12-bit two's complement, overlay in bit 14
    if signed_codestream:
        carried = carried.view(np.int16)
    expected = read_dicom(with_pixels(ds, hounsfield, tmp_path, "native")).pixels
    got = read_dicom(with_pixels(ds, carried, tmp_path, codec, codec)).pixels
    np.testing.assert_array_equal(got, expected)


def test_a_reduced_jpeg_2000_decode_ignores_the_unused_high_bits(tmp_path):
    ds, samples = unsigned_10_bit_with_a_high_bit_set()
    clean = with_pixels(ds, samples & 0x3FF, tmp_path, "clean", "jpeg-2000")
    overlaid = with_pixels(ds, samples, tmp_path, "overlaid", "jpeg-2000")
    expected = read_dicom(clean, min_side=32)
    got = read_dicom(overlaid, min_side=32)
    assert got.resolution_level == expected.resolution_level > 0
    np.testing.assert_array_equal(got.pixels, expected.pixels)


def test_an_unused_high_bit_does_not_push_colour_samples_past_one(tmp_path):
    ds, samples = unsigned_10_bit_with_a_high_bit_set()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    rgb = np.stack([samples, samples ^ 0x100, samples & 0xBFF], axis=-1)  # bit 11 set in the first two channels
    expected = read_dicom(with_pixels(ds, rgb, tmp_path, "native")).pixels
    assert expected.shape[1] == 3 and expected.max() <= 1.0
    got = read_dicom(with_pixels(ds, rgb, tmp_path, "j2k", "jpeg-2000")).pixels
    np.testing.assert_array_equal(got, expected)
