"""What an upload asks of the worklist's store: the top instances of the listed studies, not their whole rows."""

import pytest

from medtriage.serve.worklist import Worklist
from tests.serve import test_worklist as base

chest_files = base.chest_files  # the worklist tests' fixture


def test_the_listed_top_instances_are_those_of_the_listed_rows(predictor, chest_files):
    worklist = Worklist(predictor, capacity=2)
    for path in chest_files["by_p"][:4]:
        assert isinstance(worklist.score_or_reject(path.read_bytes(), path.name), list)
    listed = {study["top_sop"] for study in worklist.store.shown_studies(2)}
    assert worklist.store.shown_top_instances(2) == listed
    assert len(worklist.store.shown_studies(10)) > len(listed), "studies beyond the capacity are not listed"


def test_an_upload_keeps_the_display_copies_of_listed_studies_without_reading_their_rows(predictor, chest_files, monkeypatch):
    worklist = Worklist(predictor, capacity=1)
    monkeypatch.setattr(worklist.store, "shown_studies", _refused)
    first, second = chest_files["by_p"][:2]
    for path in (first, second):
        assert isinstance(worklist.score_or_reject(path.read_bytes(), path.name), list)
    assert set(worklist._display) == worklist.store.shown_top_instances(1)
    assert len(worklist._display) == 1


def _refused(limit):
    pytest.fail("an upload read every listed row to learn which pictures to keep")
