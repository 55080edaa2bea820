"""What an upload asks of the worklist's store: the top instances of the listed studies, not their whole rows."""

import pytest

from medtriage.serve.worklist import Worklist
from tests.serve import test_worklist as base

chest_files = base.chest_files  # the worklist tests' fixture


def test_the_listed_top_instances_are_those_of_the_listed_rows(predictor, chest_files, tmp_path):
    worklist = Worklist(predictor, capacity=2, store=tmp_path / "state")  # a state folder keeps the unlisted studies
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


def test_a_worklist_in_memory_forgets_the_studies_it_no_longer_lists(predictor, chest_files, monkeypatch):
    """Before, a service without --state kept every upload's rows and every picture it drew for as long as it ran.
    What the list leaves out is forgotten (and counted as evicted); an URGENT study of the last day is kept, since
    the list counts it as urgent and not listed."""
    worklist = Worklist(predictor, capacity=1)
    monkeypatch.setattr(worklist, "_close", lambda study_uid: _close_as_routine(worklist, study_uid))
    uploads = chest_files["by_p"][:4]
    for path in uploads:
        assert isinstance(worklist.score_or_reject(path.read_bytes(), path.name), list)
    held = worklist.store.counts()
    assert sum(held["studies"].values()) == sum(held["instances"].values()) == 1
    assert worklist.unlisted() == {"evicted": len(uploads) - 1, "urgent_not_listed": 0}


def _close_as_routine(worklist: Worklist, study_uid: str) -> None:
    """The worklist's own close, the study's priority then set to ROUTINE: the uploads' scores decide nothing here."""
    Worklist._close(worklist, study_uid)
    worklist.store._execute("UPDATE studies SET priority = 'ROUTINE' WHERE study_uid = ?", (study_uid,))


def test_a_picture_finished_after_its_study_was_forgotten_is_not_kept(predictor, chest_files, monkeypatch):
    """Drawing a picture takes a while, and an upload meanwhile can make a memory store forget the study. Saved after
    that, the picture belonged to no row and nothing ever deleted it: memory that grew with every such overlap."""
    from medtriage.serve import worklist as module

    worklist = Worklist(predictor, capacity=1)
    first, second = chest_files["by_p"][:2]  # the least suspicious: an URGENT study would be kept, not forgotten
    assert predictor.priority(chest_files["p"][first]) != "URGENT"
    assert isinstance(worklist.score_or_reject(first.read_bytes(), first.name), list)
    (row,) = worklist.rows()
    explain_frame = module.explain_frame

    def drawn_while_another_study_arrives(*args):
        drawn = explain_frame(*args)
        assert isinstance(worklist.score_or_reject(second.read_bytes(), second.name), list)
        return drawn

    monkeypatch.setattr(module, "explain_frame", drawn_while_another_study_arrives)
    assert worklist.overlay(row["id"]).startswith(b"\x89PNG")  # the reader who asked still gets it
    assert worklist.unlisted()["evicted"] == 1
    assert worklist.store._execute("SELECT sop_uid FROM overlays WHERE sop_uid NOT IN (SELECT sop_uid FROM instances)") == []
