"""Refusals of the thresholds and of the slide aggregation name the setting or field their caller read the values
from, and say what to do."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.errors import ConfigError, InputError
from medtriage.evaluation.operating_points import choose_priority_thresholds, choose_threshold, flagging_threshold
from medtriage.format.aggregation import aggregate

SCORES = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
LABELS = np.array([1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize(
    ("scores", "rate", "match"),
    [
        (np.array([0.1, np.nan]), 0.05, "not finite"),
        (np.array([]), 0.05, "no validation scores"),
        (np.arange(3.0), 1.5, "false-alarm rate"),
    ],
)
def test_an_ood_threshold_refusal_names_where_its_caller_set_it(scores, rate, match):
    with pytest.raises(InputError, match=match) as refused:
        flagging_threshold(scores, rate, where="export.ood")
    assert refused.value.where == "export.ood" and refused.value.hint


def test_ood_scores_that_are_not_finite_are_refused_with_how_to_find_their_image():
    with pytest.raises(InputError, match="not finite") as refused:
        flagging_threshold(np.array([0.1, np.inf, 0.3]), 0.05)
    assert "overflow" in refused.value.hint and "find it among the images scored" in refused.value.hint


def test_a_rule_without_a_target_names_the_target_setting_and_a_value():
    with pytest.raises(ConfigError, match="needs a target") as refused:
        choose_threshold(SCORES, LABELS, "sensitivity")
    assert refused.value.where == "export.threshold_target"
    assert "export.threshold_target=0.95" in refused.value.hint


@pytest.mark.parametrize(("rule", "target", "setting"), [("max", 0.9, "export.urgent_rule"), ("specificity", None, "export.urgent_target")])
def test_an_urgent_point_that_cannot_be_chosen_names_the_urgent_setting_not_the_review_one(rule, target, setting):
    with pytest.raises(ConfigError) as refused:
        choose_priority_thresholds(SCORES, LABELS, "youden", None, rule, target)
    assert refused.value.where == setting and refused.value.hint


@pytest.mark.parametrize(
    ("method", "top_k", "setting"), [("max", 3, "pathology.aggregation")] + [("top_k", k, "pathology.top_k") for k in (0, -2, 2.5, True)]
)
def test_a_slide_aggregation_serving_cannot_follow_names_the_packages_field(method, top_k, setting):
    with pytest.raises(ConfigError) as refused:
        aggregate(np.array([0.1, 0.9, 0.5]), method, top_k)
    assert refused.value.where == setting and refused.value.hint


def test_a_packages_top_k_of_no_tiles_is_refused_when_a_slide_is_scored():
    from medtriage.serve.slides import SlideSettings, served_slide_score

    settings = SlideSettings.from_meta({"aggregation": "top_k", "top_k": 0})  # was taken as 1 without a word
    with pytest.raises(ConfigError, match="not a number of tiles") as refused:
        served_slide_score(np.array([0.1, 0.9, 0.5]), settings)
    assert refused.value.where == "pathology.top_k"


def test_a_whole_top_k_still_averages_the_highest_tiles():
    assert aggregate(np.array([0.1, 0.9, 0.5]), "top_k", 2.0) == pytest.approx(0.7)
    assert aggregate(np.array([0.1, 0.9, 0.5]), "top_k", np.int64(9)) == pytest.approx(0.5)  # all of them
