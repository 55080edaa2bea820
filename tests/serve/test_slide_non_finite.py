"""A slide whose tiles the graph returns NaN for is refused with the tile named, never given a routine score: NaN
tiles would otherwise drop out of a top-k score unnoticed or make a mean score NaN."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.errors import PackageError
from medtriage.serve.slides import SlideSettings, score_slide
from tests.serve.test_slides import CMU1, SETTINGS
from tests.serve.test_slides import predict as predict  # noqa: F401 -- the module fixture (a real ONNX graph)


@pytest.mark.parametrize("aggregation", ["top_k", "mean"])
def test_a_tile_with_a_nan_probability_refuses_the_slide_and_names_the_tile(predict, aggregation):  # noqa: F811
    settings = SlideSettings(**{**vars(SETTINGS), "aggregation": aggregation})
    calls = []

    def nan_in_second_batch(batch: np.ndarray) -> np.ndarray:
        probs = np.array(predict(batch), dtype=np.float32)
        calls.append(len(batch))
        if len(calls) == 2:
            probs[0] = np.nan
        return probs

    assert np.isfinite(score_slide(CMU1, predict, settings).score)  # the unchanged graph scores the slide
    with pytest.raises(PackageError, match="NaN or infinite probabilities") as refused:
        score_slide(CMU1, nan_in_second_batch, settings, batch_size=4)
    assert "tile at (" in str(refused.value.where) and refused.value.hint
