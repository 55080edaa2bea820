"""`medtriage score` where it met the user roughly: a decoder's traceback printed though another decoder read the file,
an unsupported transfer syntax called damaged data, --sr silently writing nothing for slides, Ctrl-C losing every row
scored, and an absurd µm/pixel value printed as a 300-digit number (or used)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file

from medtriage.cli import build_parser, main
from medtriage.errors import ConfigError, DicomError, InputError
from medtriage.io.dicom import read_dicom
from medtriage.io.header_warnings import say_header_warnings
from medtriage.io.pathology import open_slide, tile_grid
from tests.export.tiny_package import shared_tiny_package

ROOT = Path(__file__).resolve().parents[2]
CMU1 = ROOT / "data" / "samples" / "CMU-1-Small-Region.svs"
MEDTRIAGE = Path(sys.executable).with_name("medtriage")
# 12-bit JPEG Extended: pylibjpeg and Pillow both fail on it, imagecodecs (the second opinion) reads it
PLUGINS_FAIL_FALLBACK_READS = get_testdata_file("JPEG-lossy.dcm")
CT = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory) -> Path:
    return shared_tiny_package(tmp_path_factory)[0].package_dir


@pytest.fixture
def slide_package(package_dir, tmp_path) -> Path:
    """A copy of the tiny package with a `pathology` block, so that it scores slides."""
    copy = Path(shutil.copytree(package_dir, tmp_path / package_dir.name))
    meta = json.loads((copy / "model.json").read_text())
    meta["pathology"] = {
        "tile_size": 112,
        "tile_mpp": 0.5,
        "stain_normalization": None,
        "min_tissue": 0.5,
        "aggregation": "top_k",
        "top_k": 3,
    }
    (copy / "model.json").write_text(json.dumps(meta))
    return copy


# --- a decoder that fails before another reads the file ------------------------------------------


def test_a_decoder_that_fails_before_the_fallback_reads_the_file_prints_no_traceback(capsys, no_header_warnings_said):
    say_header_warnings()
    image = read_dicom(PLUGINS_FAIL_FALLBACK_READS)
    assert image.pixels.shape == (1, 1, 1024, 256)  # read by the fallback
    err = capsys.readouterr().err
    assert "Traceback" not in err and "libjpeg error" not in err and "Pillow does not support" not in err


def test_a_record_with_a_traceback_is_said_on_one_line_without_it(capsys, no_header_warnings_said):
    say_header_warnings()
    try:
        raise ValueError("odd value")
    except ValueError:
        logging.getLogger("pydicom.dataset").exception("a value could not be read")
    assert capsys.readouterr().err.splitlines() == ["warning: a value could not be read"]


def test_when_every_decoder_fails_the_error_alone_names_each_reason(capsys, no_header_warnings_said):
    say_header_warnings()
    with pytest.raises(DicomError, match="pylibjpeg: .* pillow: ") as err:
        read_dicom(damaged_in_the_middle(get_testdata_file("JPEG2000.dcm")), name="image.dcm")
    assert "damaged" in err.value.hint  # the decoders read the codestream and found it wrong
    assert capsys.readouterr().err == ""  # said once, by the error


def damaged_in_the_middle(path: str) -> bytes:
    """The file with 64 bytes in the middle of its pixel data flipped."""
    raw = Path(path).read_bytes()
    middle = len(raw) - len(pydicom.dcmread(path).PixelData) // 2
    return raw[:middle] + bytes(b ^ 0x5A for b in raw[middle : middle + 64]) + raw[middle + 64 :]


# --- a transfer syntax this installation cannot decode -------------------------------------------


def with_transfer_syntax(source: str, uid: str) -> bytes:
    """A real file whose file meta names another transfer syntax (the data set stays as it was)."""
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = uid
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize(
    "source, uid, named, remedy",
    [
        (CT, "1.2.826.0.1.3680043.9999.7", "a private transfer syntax", "standard transfer syntax"),  # a sender's private syntax
        (get_testdata_file("JPEG2000.dcm"), "1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2", "gdcmconv"),
        (get_testdata_file("JPEG2000.dcm"), "1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264", "video"),
    ],
)
def test_a_transfer_syntax_without_a_decoder_is_named_as_unsupported_not_damaged(source, uid, named, remedy):
    with pytest.raises(DicomError) as err:
        read_dicom(with_transfer_syntax(source, uid), name="image.dcm")
    assert f"transfer syntax {uid}" in err.value.reason and named in err.value.reason
    assert "not supported by this installation" in err.value.reason
    assert remedy in err.value.hint and "damaged" not in err.value.hint


def test_a_transfer_syntax_whose_decoders_are_not_installed_names_what_to_install(monkeypatch):
    """RLE with its plugins uninstalled: as pydicom's decoder describes itself then."""
    decoder = pydicom.pixels.get_decoder(pydicom.uid.RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    with pytest.raises(DicomError) as err:
        read_dicom(get_testdata_file("MR_small_RLE.dcm"))
    assert "transfer syntax 1.2.840.10008.1.2.5 (RLE Lossless) is not supported by this installation" in err.value.reason
    assert "pylibjpeg-rle" in err.value.hint and "damaged" not in err.value.hint


# --- --sr and slides -----------------------------------------------------------------------------


def test_the_sr_option_says_that_slides_get_none():
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (sr,) = [a for a in commands.choices["score"]._actions if "--sr" in a.option_strings]
    assert "no SR for whole-slide images" in sr.help


def test_scoring_slides_with_sr_says_once_that_no_sr_is_written_for_them(slide_package, tmp_path, capsys):
    slides = [tmp_path / "a.svs", tmp_path / "b.svs"]
    for slide in slides:
        slide.symlink_to(CMU1)  # two names, one file: scored once, as it is
    code = main(["score", str(slide_package), *map(str, slides), str(tmp_path / "c.svs"), "--sr", str(tmp_path / "sr"), "--json"])
    assert code == 1  # c.svs is not there
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "SR" in line and "slide" in line]
    assert len(said) == 1 and said[0].startswith("note: ") and "no DICOM SR is written for whole-slide images" in said[0]
    assert not list((tmp_path / "sr").iterdir())


# --- Ctrl-C during a long run --------------------------------------------------------------------


def test_ctrl_c_prints_the_rows_scored_so_far_and_ends_130(package_dir, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    files = 400  # tens of milliseconds each: the run is still going when the signal comes
    for i in range(files):
        shutil.copyfile(CT, study / f"ct{i:03}.dcm")
    sr = tmp_path / "sr"
    command = [str(MEDTRIAGE), "score", str(package_dir), str(study), "--csv", "--sr", str(sr), "--allow-out-of-scope", "--threads", "1"]
    # A shell's background jobs start with SIGINT ignored, and a child keeps that: Ctrl-C reaches a terminal's job.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_at_a_terminal) as run:
        _wait_for_a_file_in(sr, run)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert 1 <= len(rows) < files and {row["status"] for row in rows} == {"scored"}
    assert [Path(row["file"]).name for row in rows] == [f"ct{i:03}.dcm" for i in range(len(rows))]  # in order, none lost
    assert f"interrupted after {len(rows)} of {files} file(s)" in err
    assert "Traceback" not in err


def test_a_stop_just_after_a_slide_heatmap_is_written_still_reports_its_row(slide_package, tmp_path, monkeypatch, capsys):
    """Before, the heatmap was written inside the slide's scoring: a stop coming then left a heatmap on disk that no
    row of the output named. It is written with the row now, as an SR is, and the stop waits for both."""
    import medtriage.serve.slides as slides

    write = slides.write_atomic

    def written_then_stopped(*args, **kwargs):
        write(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop, as the file lands

    monkeypatch.setattr(slides, "write_atomic", written_then_stopped)
    heatmaps, second = tmp_path / "heatmaps", tmp_path / "second.svs"
    shutil.copyfile(CMU1, second)  # another file: a link to the same one is scored once
    code = main(["score", str(slide_package), str(CMU1), str(second), "--heatmaps", str(heatmaps), "--json"])
    out, err = capsys.readouterr()
    assert code == 130, err
    (row,) = json.loads(out)["results"]
    assert [str(p) for p in heatmaps.iterdir()] == [row["heatmap"]]
    assert "interrupted after 1 of 2 file(s)" in err


def _ctrl_c_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_a_file_in(folder: Path, run: subprocess.Popen) -> None:
    """Until the first SR is there: the first file was scored."""
    deadline = time.monotonic() + 120
    while not (folder.is_dir() and any(p.suffix == ".dcm" for p in folder.iterdir())):
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline, "no SR written in two minutes"
        time.sleep(0.005)


# --- absurd µm/pixel values ----------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [1e308, 5000.0])
def test_an_absurdly_coarse_resolution_override_is_refused(mpp):
    with pytest.raises(InputError, match="implausible scan resolution from the override") as err:
        open_slide(CMU1, mpp=mpp)
    assert len(str(err.value)) < 300 and "--mpp" in str(err.value)


def test_an_absurdly_coarse_resolution_tag_is_refused(tmp_path):
    path = tmp_path / "slide.tif"  # 1 pixel per cm: 10,000 µm/pixel
    tifffile.imwrite(
        path, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb", resolution=(1, 1), resolutionunit="CENTIMETER"
    )
    with pytest.raises(InputError, match="implausible scan resolution from the slide's metadata: 1e\\+04 µm/pixel"):
        open_slide(path)


@pytest.mark.parametrize("tile_mpp", [1e308, float("inf"), 0.0, -1.0])
def test_an_absurd_tile_resolution_is_refused_by_the_tile_grid(tile_mpp):
    with open_slide(CMU1) as slide, pytest.raises(ConfigError, match="µm/pixel") as err:
        tile_grid(slide, 112, tile_mpp)
    assert len(str(err.value)) < 300


def test_the_coarser_slide_message_shows_resolutions_in_few_digits():
    with open_slide(CMU1, mpp=987.654321) as slide, pytest.raises(InputError) as err:
        tile_grid(slide, 112, 0.5)
    assert "slide scanned at 987.7 µm/pixel is coarser than the 0.5 µm/pixel the tiles need" in str(err.value)


def test_score_with_an_absurd_mpp_rejects_the_slide_in_one_short_line(slide_package, capsys):
    code = main(["score", str(slide_package), str(CMU1), "--mpp", "1e308", "--json"])
    (rejected,) = json.loads(capsys.readouterr().out)["rejected"]
    assert code == 1 and "implausible scan resolution from the override: 1e+308 µm/pixel" in rejected["reason"]
    assert len(rejected["reason"]) < 300
