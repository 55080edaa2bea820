"""Hostile DICOM: real files mutated by Hypothesis (truncated, bit-flipped, lengths, VRs, tags, sizes,
transfer syntax, pixel data) through read_dicom, Predictor scoring, ingest and POST /v1/score.
Every outcome is a result or a typed rejection: never a traceback, never a 5xx.

MEDTRIAGE_FUZZ_EXAMPLES sets the examples per target (default 100: the CI run stays well within a
minute); `python -m benchmarks.serve_load --fuzz-examples N` runs it longer.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from medtriage.errors import MedTriageError
from medtriage.io.deid import DeidOptions
from medtriage.io.dicom import read_dicom
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.site_key import SiteKey
from medtriage.serve.http import create_app
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor, Rejection

EXAMPLES = int(os.environ.get("MEDTRIAGE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="MEDTRIAGE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
SEEDS = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "emri_small.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEGLSNearLossless_16.dcm",
    "no_meta.dcm",
    "SC_rgb_small_odd.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
]
SEED_BYTES = {name: open(get_testdata_file(name), "rb").read() for name in SEEDS}
SIZE_TAGS = [
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PlanarConfiguration",
    "RescaleSlope",
    "WindowWidth",
    "WindowCenter",
]
SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
    "1.2.3.4.not.a.syntax",
    "",
]
VRS = ["US", "SS", "UL", "OB", "OW", "DS", "IS", "CS", "UI", "SQ", "UN", "FD", "AT", "LO"]


def _typed_names() -> set[str]:
    names, stack = set(), [MedTriageError]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack += cls.__subclasses__()
    return names


def _rewrite(data: bytes, change) -> bytes:
    """Parse `data`, apply `change(ds)`, write it back as it was encoded; the original when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            change(ds)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=False)
        return out.getvalue()
    except Exception:  # some mutations cannot be written: fall back to byte-level damage
        return data


@st.composite
def mutated(draw) -> bytes:
    data = SEED_BYTES[draw(st.sampled_from(SEEDS))]
    kind = draw(st.sampled_from(["truncate", "flip", "flip_pixels", "length", "size", "syntax", "vr", "drop", "pixels", "splice"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if kind in ("flip", "flip_pixels"):
        buffer = bytearray(data)
        low = len(buffer) // 2 if kind == "flip_pixels" else 0
        for position in draw(st.lists(st.integers(low, len(buffer) - 1), min_size=1, max_size=32)):
            buffer[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(buffer)
    if kind == "length":  # overwrite a 16- or 32-bit length field after some tag with a hostile value
        buffer = bytearray(data)
        at = draw(st.integers(132, max(132, len(buffer) - 8)))
        value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE, len(data) * 4]))
        buffer[at : at + 4] = struct.pack("<I", value)
        return bytes(buffer)
    if kind == "size":
        keyword = draw(st.sampled_from(SIZE_TAGS))
        value = draw(st.sampled_from([0, 1, 3, 7, 17, 65535, 2**31 - 1, -1, 10**9]))
        return _rewrite(
            data, lambda ds: setattr(ds, keyword, value if keyword not in ("RescaleSlope", "WindowWidth", "WindowCenter") else str(value))
        )
    if kind == "syntax":
        syntax = draw(st.sampled_from(SYNTAXES))
        return _rewrite(data, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", syntax))
    if kind == "vr":
        keyword = draw(st.sampled_from(SIZE_TAGS + ["PixelData", "PhotometricInterpretation", "SOPInstanceUID"]))
        vr = draw(st.sampled_from(VRS))

        def change_vr(ds):
            if keyword in ds:
                raw = ds[keyword]
                ds[Tag(keyword)] = RawDataElement(
                    Tag(keyword),
                    vr,
                    len(bytes(raw.value) if isinstance(raw.value, bytes) else 2),
                    b"\0\1" if not isinstance(raw.value, bytes) else raw.value,
                    0,
                    False,
                    True,
                )

        return _rewrite(data, change_vr)
    if kind == "drop":
        keyword = draw(
            st.sampled_from(
                SIZE_TAGS + ["PixelData", "PhotometricInterpretation", "TransferSyntaxUID", "SOPClassUID", "ModalityLUTSequence"]
            )
        )
        return _rewrite(data, lambda ds: delattr(ds, keyword) if keyword in ds else None)
    if kind == "pixels":  # pixel data cut short or replaced by noise
        fraction = draw(st.floats(0, 1.5))
        noise = draw(st.binary(min_size=0, max_size=2048))

        def change_pixels(ds):
            if "PixelData" in ds:
                ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * fraction)] + noise

        return _rewrite(data, change_pixels)
    other = SEED_BYTES[draw(st.sampled_from(SEEDS))]  # the header of one file and the tail of another
    return data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]


TYPED_NAMES = _typed_names()


@pytest.fixture(scope="module")
def predictor(package_dir) -> Predictor:
    return Predictor(load_package(package_dir), threads=1)


@FUZZ
@given(data=mutated())
def test_read_dicom_returns_pixels_or_a_typed_error(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_dicom(data)
        except MedTriageError:
            return
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 4 and image.frames == image.pixels.shape[0]


@FUZZ
@given(data=mutated())
def test_scoring_gives_scores_or_a_typed_rejection(predictor, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = predictor.score_or_reject(data, "fuzzed.dcm")
    if isinstance(outcome, Rejection):
        assert outcome.error in TYPED_NAMES, f"untyped rejection {outcome.error}: {outcome.reason}"
    else:
        assert all(0 <= s.probability <= 1 for s in outcome)


@FUZZ
@given(data=mutated())
def test_ingest_pools_or_quarantines_every_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "input.dcm"
    path.write_bytes(data)
    init_worker(SiteKey(b"fuzz-secret-0123456789abcdef0123"), DeidOptions(), frozenset(), False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = process_file(str(path))
    assert outcome.status in ("pending", "quarantined") and outcome.content_key
    assert outcome.status == "quarantined" or outcome.encoded


def test_a_folder_of_mutants_ingests_with_every_file_counted(tmp_path):
    """The whole ingest over many mutants at once: counts in = pooled + quarantined, nothing raised."""
    site = tmp_path / "site"
    site.mkdir()
    for i in range(40):
        site.joinpath(f"{i:03d}.dcm").write_bytes(_mutant(i))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = ingest_site("fuzz", site, tmp_path / "pool", key=SiteKey(b"fuzz-secret-0123456789abcdef0123"), progress=False)
    assert summary.counts_in == 40 == summary.pooled + sum(summary.quarantined.values())


def _mutant(i: int) -> bytes:
    """A deterministic damaged copy of a seed file (no Hypothesis: a fixed folder for the whole-ingest check)."""
    rng = np.random.default_rng(i)
    data = bytearray(SEED_BYTES[SEEDS[i % len(SEEDS)]])
    if i % 3 == 0:
        return bytes(data[: int(rng.integers(0, len(data)))])
    for position in rng.integers(128, len(data), size=int(rng.integers(1, 16))):
        data[position] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor), raise_server_exceptions=False)


@FUZZ
@given(data=mutated(), raw=st.booleans())
def test_post_score_never_answers_5xx(client, data, raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if raw:
            response = client.post("/v1/score", content=data, headers={"Content-Type": "application/dicom"})
        else:
            response = client.post("/v1/score", files=[("files", ("fuzzed.dcm", data, "application/dicom"))])
    assert response.status_code in (200, 400, 413, 422), response.text
    body = response.json()
    for rejected in body.get("rejected", []):
        assert rejected["error"] in TYPED_NAMES, rejected
