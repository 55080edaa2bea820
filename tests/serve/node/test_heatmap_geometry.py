"""The heatmap Secondary Capture shows its source's shape and side: a source of non-square pixels (0.5 mm rows,
1.0 mm columns) gives a heatmap whose Pixel Aspect Ratio makes a viewer draw it as unstretched as the source, and the
source's laterality and view position come along for hanging protocols. Sources: pydicom's CT_small, altered."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.serve.dicom_results import encoded
from medtriage.serve.node.heatmap import image_laterality, pixel_aspect_ratio, secondary_capture


def _source(tmp_path: Path, name: str = "source.dcm", **attributes) -> Path:
    """CT_small (128 x 128, 0.66 mm square pixels) cropped to 128 rows x 64 columns, with `attributes` set (None
    deletes one)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, :64]).tobytes()
    ds.Columns = 64
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def _heatmap(predictor, path: Path) -> pydicom.Dataset:
    scores = predictor.score_or_reject(path, path.name)
    return pydicom.dcmread(io.BytesIO(encoded(secondary_capture(predictor, path, scores[0]), "the heatmap", path.name)))


def _displayed_height_over_width(ds: pydicom.Dataset, vertical: float, horizontal: float) -> float:
    return ds.Rows * vertical / (ds.Columns * horizontal)


@pytest.mark.parametrize(
    "spacing",
    [
        {"PixelSpacing": [0.5, 1.0]},
        {"PixelSpacing": None, "ImagerPixelSpacing": [0.5, 1.0]},
        {"PixelSpacing": None, "PixelAspectRatio": [1, 2]},
    ],
    ids=["pixel-spacing", "imager-pixel-spacing", "pixel-aspect-ratio"],
)
def test_a_heatmap_of_non_square_pixels_is_displayed_with_the_source_shape(predictor, tmp_path, spacing):
    source_path = _source(tmp_path, **spacing)
    source = pydicom.dcmread(source_path)
    heatmap = _heatmap(predictor, source_path)
    assert [int(value) for value in heatmap.PixelAspectRatio] == [1, 2]  # vertical : horizontal
    assert "PixelSpacing" not in heatmap  # a picture to look at, not to measure on
    shown = _displayed_height_over_width(heatmap, *heatmap.PixelAspectRatio)
    assert shown == pytest.approx(_displayed_height_over_width(source, 0.5, 1.0), rel=0.02)  # 128 x 0.5 : 64 x 1.0


def test_a_heatmap_of_square_pixels_claims_no_aspect_ratio(predictor, tmp_path):
    heatmap = _heatmap(predictor, _source(tmp_path, PixelSpacing=[0.6614584, 0.6614583]))  # equal but for rounding
    assert "PixelAspectRatio" not in heatmap


def test_pixel_aspect_ratio_of_an_enhanced_frame_comes_from_its_pixel_measures():
    def group(spacing):
        measures = pydicom.Dataset()
        measures.PixelSpacing = spacing
        item = pydicom.Dataset()
        item.PixelMeasuresSequence = [measures]
        return item

    source = pydicom.Dataset()
    source.PerFrameFunctionalGroupsSequence = [group([0.2, 0.2]), group([0.3, 0.2])]
    assert pixel_aspect_ratio(source, 1) is None
    assert pixel_aspect_ratio(source, 2) == [3, 2]
    source.PixelSpacing = [0, 1]  # an impossible value is skipped, not trusted and not fatal
    assert pixel_aspect_ratio(source, 2) == [3, 2]


@pytest.mark.parametrize(
    "attributes, laterality",
    [
        ({"ImageLaterality": "L", "Laterality": None}, "L"),
        ({"Laterality": "R"}, "R"),
        ({"ImageLaterality": "B", "Laterality": "R"}, "B"),  # the image's own, over its series'
    ],
)
def test_a_heatmap_carries_the_source_laterality_and_view(predictor, tmp_path, attributes, laterality):
    heatmap = _heatmap(predictor, _source(tmp_path, ViewPosition="CC", **attributes))
    assert heatmap.ImageLaterality == laterality
    assert heatmap.ViewPosition == "CC"


def test_a_heatmap_of_a_source_without_laterality_claims_none(predictor, tmp_path):
    heatmap = _heatmap(predictor, _source(tmp_path, Laterality="nonsense", ViewPosition="not a code string!"))
    assert "ImageLaterality" not in heatmap and "ViewPosition" not in heatmap


def test_laterality_of_an_enhanced_frame_comes_from_its_frame_anatomy():
    def group(side):
        anatomy = pydicom.Dataset()
        anatomy.FrameLaterality = side
        item = pydicom.Dataset()
        item.FrameAnatomySequence = [anatomy]
        return item

    source = pydicom.Dataset()
    source.PerFrameFunctionalGroupsSequence = [group("R"), group("L")]
    assert [image_laterality(source, 1), image_laterality(source, 2)] == ["R", "L"]
