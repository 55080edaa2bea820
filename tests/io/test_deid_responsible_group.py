"""Coded attributes that name the site's care group or department, or a person, which Table E.1-1 does not list:

- Responsible Group Code Sequence (0008,0220): the group (department, unit, service) responsible, as codes whose
  meaning is free text (`Saint Elsewhere Cardiology`) and whose scheme may be the site's own;
- Hanging Protocol User Identification Code Sequence (0072,000E): the user a hanging protocol is for, as codes (a staff
  ID, a name), with Hanging Protocol Creator (0072,0008) and Hanging Protocol User Group Name (0072,0010) beside it.

Before, each stayed as written, at the top level and in any item. Each is planted at the top level, in a kept item and
in an item of that item, in explicit and implicit VR files, and must be in no byte of the written file. The coded
attributes of the same kind that the table or `deid.BEYOND_TABLE` already handles (institution, department type,
requesting service, person identification, station name and location, human performer, verifying observer) are checked
the same way, so that none of them starts leaking unnoticed."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from medtriage.io.deid import deidentify
from tests.io.test_deid_beyond_table_more import KEY, PERSON, SITE, STAFF_ID, SYNTAXES, _code, _leaked, _reference, _saved
from tests.io.test_deid_edges import _reread

PLANTED = (SITE, "STELSEW", PERSON, STAFF_ID)

# keyword, a value naming the site or a person (made afresh for each use), the outcome: gone, emptied or a dummy
KEPT_BEFORE = [
    ("ResponsibleGroupCodeSequence", lambda: [_code("STELSEW-CARD", f"{SITE} Cardiology")], "X"),
    ("HangingProtocolUserIdentificationCodeSequence", lambda: [_code(STAFF_ID, PERSON)], "Z"),
    ("HangingProtocolCreator", lambda: f"{PERSON} at {SITE}", "D"),
    ("HangingProtocolUserGroupName", lambda: f"{SITE} neuroradiologists", "X"),
]
# handled already (by the table: D, X, Z; or BEYOND_TABLE: X); checked so that they stay handled
HANDLED = [
    ("InstitutionCodeSequence", lambda: [_code("STELSEW", f"{SITE} General Hospital")], "Z"),  # X/Z/D: emptied
    ("InstitutionalDepartmentTypeCodeSequence", lambda: [_code("STELSEW-RAD", f"{SITE} Radiology")], "X"),
    ("RequestingServiceCodeSequence", lambda: [_code("STELSEW-CARD", f"{SITE} Cardiology")], "X"),
    ("PersonIdentificationCodeSequence", lambda: [_code(STAFF_ID, PERSON)], "Z"),  # D on a sequence: emptied
    ("ScheduledStationNameCodeSequence", lambda: [_code("STELSEW-CT2", f"{SITE} CT 2")], "X"),
    ("ScheduledStationGeographicLocationCodeSequence", lambda: [_code("STELSEW-B4", f"{SITE} building 4")], "X"),
    ("PerformedStationNameCodeSequence", lambda: [_code("STELSEW-CT2", f"{SITE} CT 2")], "X"),
    ("PerformedStationGeographicLocationCodeSequence", lambda: [_code("STELSEW-B4", f"{SITE} building 4")], "X"),
    ("HumanPerformerCodeSequence", lambda: [_code(STAFF_ID, PERSON)], "X"),
    ("VerifyingObserverIdentificationCodeSequence", lambda: [_code(STAFF_ID, PERSON)], "Z"),
]


def _planted(keyword: str, value) -> Dataset:
    """CT_small with `keyword` at the top level, in a Referenced Image Sequence item and in an item inside that one."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    setattr(ds, keyword, value())
    nested, deeper = _reference(ds), _reference(ds)
    setattr(nested, keyword, value())
    setattr(deeper, keyword, value())
    nested.ReferencedImageSequence = [deeper]
    ds.ReferencedImageSequence = [nested]
    return ds


def _check(keyword: str, value, action: str, syntax) -> None:
    ds = _reread(_planted(keyword, value), syntax)
    assert _leaked(_saved(ds), *PLANTED)
    deidentify(ds, KEY)
    data = _saved(ds)
    assert _leaked(data, *PLANTED) == []
    written = pydicom.dcmread(io.BytesIO(data))
    nested = written.ReferencedImageSequence[0]
    for where in (written, nested, nested.ReferencedImageSequence[0]):
        if action == "X":
            assert keyword not in where
        elif action == "Z":
            assert keyword in where and where[keyword].is_empty  # present, empty (Type 2 where the IOD has it)
        else:
            assert where[keyword].value == "ANONYMIZED"
    assert "ReferencedSOPInstanceUID" in nested and "ReferencedSOPInstanceUID" in nested.ReferencedImageSequence[0]


@SYNTAXES
@pytest.mark.parametrize("keyword, value, action", KEPT_BEFORE, ids=[k for k, _, _ in KEPT_BEFORE])
def test_coded_groups_and_users_the_table_keeps_go_at_any_depth(keyword, value, action, syntax):
    _check(keyword, value, action, syntax)


@SYNTAXES
@pytest.mark.parametrize("keyword, value, action", HANDLED, ids=[k for k, _, _ in HANDLED])
def test_coded_institutions_departments_and_people_already_handled_stay_handled(keyword, value, action, syntax):
    _check(keyword, value, action, syntax)
