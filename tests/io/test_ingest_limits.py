"""Ingest limits on what a site folder may hold: a file too large to read whole, a placeholder name standing in for
a patient, and one Patient ID written with and without its issuer."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtriage.cli import main as cli_main
from medtriage.cli.ingest_sites import main as ingest_sites_main
from medtriage.errors import ConfigError
from medtriage.io import ingest_file
from medtriage.io.decode_limits import DecodeLimits
from medtriage.io.deid import DeidOptions, deidentify, patient_key
from medtriage.io.ingest import ingest_site
from medtriage.io.ingest_ledger import INDEX_FILE, ledger_folder
from medtriage.io.quarantine import screen
from medtriage.io.site_key import SiteKey

KEY_TEXT = "test-site-secret-0123456789abcdef"
KEY = SiteKey(KEY_TEXT.encode())
SPARSE_BYTES = 4 << 30  # over the default limit; truncate writes nothing, so it costs no disk


def _image(patient_id: str | None = "MRN-1", name: str | None = "DOE^JANE", issuer: str | None = None, n: int = 0):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in (("PatientID", patient_id), ("PatientName", name), ("IssuerOfPatientID", issuer)):
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(patient_id), str(name), str(n)])
    return ds


def _write(folder: Path, images: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(images):
        ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)


def _status(st_size: int) -> SimpleNamespace:
    """A regular file's status as os.fstat gives it, with the size that is asked for."""
    return SimpleNamespace(st_size=st_size, st_mode=stat.S_IFREG, st_dev=0, st_ino=0, st_mtime_ns=0, st_ctime_ns=0)


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- file size


def test_a_file_over_the_size_limit_is_listed_as_too_large_unread_and_uncopied(tmp_path):
    _write(tmp_path / "site", [_image()])
    big = _sparse(tmp_path / "site" / "huge.dcm", 3 << 20)
    quarantine = tmp_path / "q"
    summary = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=quarantine, max_file_bytes=1 << 20, progress=False)
    assert summary.pooled_new == 1 and dict(summary.quarantined) == {"too_large": 1}
    assert summary.counts_in == summary.pooled + sum(summary.quarantined.values())
    [listed] = _csv(quarantine / "quarantine.csv")
    assert listed["reason"] == "too_large" and listed["source"] == str(big)
    assert str(3 << 20) in listed["detail"] and str(1 << 20) in listed["detail"] and "--max-file-bytes" in listed["detail"]
    assert not (quarantine / "too_large").exists()  # the original stays at the site; a copy would cost its size again
    again = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, quarantine=quarantine, max_file_bytes=1 << 20, progress=False)
    assert again.pooled_before == 1 and dict(again.quarantined) == {"too_large": 1}  # not indexed: looked at again


def test_the_default_limit_refuses_a_multi_gigabyte_file_from_its_size_alone(tmp_path):
    (tmp_path / "site").mkdir()
    _sparse(tmp_path / "site" / "huge.dcm", SPARSE_BYTES)
    summary = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert dict(summary.quarantined) == {"too_large": 1}
    assert ingest_file.DEFAULT_MAX_FILE_BYTES == DecodeLimits().max_decoded_bytes < SPARSE_BYTES


def test_a_file_growing_past_the_limit_after_its_size_was_read_is_refused(tmp_path, monkeypatch):
    big = _sparse(tmp_path / "grown.dcm", 3 << 20)
    monkeypatch.setattr(ingest_file.os, "fstat", lambda fd: _status(st_size=100))  # its size before it grew
    ingest_file.init_worker(KEY, DeidOptions(), frozenset(), False, 1 << 20)
    out = ingest_file.process_file(str(big))
    assert (out.status, out.reason) == ("unread", "too_large") and str(1 << 20) in out.detail
    _write(tmp_path / "site", [_image()])  # grown, but within the limit: read whole and pooled
    assert ingest_file.process_file(str(tmp_path / "site" / "IM0000.dcm")).status == "pending"


def test_both_ingest_commands_take_the_size_limit(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "sites" / "a", [_image()])
    _sparse(tmp_path / "sites" / "a" / "huge.dcm", 200_000)  # the image beside it is ~ 40 kB
    monkeypatch.setenv("MEDTRIAGE_SITE_SECRET", "e" * 64)
    assert (
        cli_main(["ingest", str(tmp_path / "sites" / "a"), "--site", "a", "--into", str(tmp_path / "p1"), "--max-file-bytes", "100000"])
        == 0
    )
    assert "too_large 1" in capsys.readouterr().out
    args = ["--sites", str(tmp_path / "sites"), "--into", str(tmp_path / "p2"), "--keys", str(tmp_path / "keys"), "--create-keys"]
    assert ingest_sites_main([*args, "--max-file-bytes", "100000"]) == 0
    assert "too_large 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ingest_sites_main([*args, "--max-file-bytes", "0"])
    assert "at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- placeholder names


PLACEHOLDERS = ["ANONYMOUS", "^", "UNKNOWN", "", "ANON", "NONE", "TEST", "^^ ^", "anonymous^^", " Unknown ", "^Anon^"]


@pytest.mark.parametrize("name", PLACEHOLDERS)
def test_a_placeholder_name_without_a_patient_id_identifies_nobody(name):
    ds = _image(patient_id=None, name=name)
    ds.PatientBirthDate = "19700101"
    assert patient_key(ds) is None and screen(ds).reason == "no_patient_identity"


def test_a_real_name_keeps_its_key_and_its_pseudonym():
    ds = _image(patient_id=None, name="DOE^JANE ")
    ds.PatientBirthDate = "19700101"
    assert patient_key(ds) == "name|DOE^JANE|19700101"  # the key pools built before use
    assert deidentify(ds, KEY).pseudonym == KEY.pseudonym("name|DOE^JANE|19700101")


def test_ingest_counts_files_identified_by_name_and_quarantines_placeholders(tmp_path):
    images = [_image("MRN-1", n=0), _image("MRN-2", n=1), _image(None, "DOE^JANE", n=2), _image(None, "ROE^RICHARD", n=3)]
    images += [_image(None, "ANONYMOUS", n=4), _image(None, "^", n=5)]
    _write(tmp_path / "site", images)
    summary = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert summary.pooled_new == 4 and dict(summary.quarantined) == {"no_patient_identity": 2}
    assert summary.identified_by_name == 2 and "2 identified by name" in summary.line()
    log = json.loads(Path(summary.log_path).read_text())
    assert log["counts"]["identified_by_name"] == 2


@pytest.mark.parametrize("placeholder", ["ANONYMOUS", " unknown ", "0000000", "0", "-", "N/A", "NONE"])
def test_a_placeholder_patient_id_is_no_identity_so_the_name_identifies_the_patient(placeholder):
    """Before, everyone with that ID was one patient: patients of a site exported as ANONYMOUS were one pseudonym, their
    images kept in one split, and the per-patient figures counted one patient."""
    jane, richard = _image(placeholder, "DOE^JANE", n=0), _image(placeholder, "ROE^RICHARD", n=1)
    assert patient_key(jane) == "name|DOE^JANE|" != patient_key(richard)
    assert deidentify(jane, KEY).pseudonym != deidentify(richard, KEY).pseudonym
    nobody = _image(placeholder, "ANONYMOUS", n=2)
    assert patient_key(nobody) is None and screen(nobody).reason == "no_patient_identity"


def test_an_id_that_merely_holds_zeros_or_a_placeholder_word_is_a_patient_id():
    for real in ("MRN-0001", "100", "ANON-17", "0.5a"):
        assert patient_key(_image(real)) == f"|{real}"


def test_ingest_identifies_the_patients_of_placeholder_ids_by_name_and_says_so(tmp_path):
    images = [_image("ANONYMOUS", "DOE^JANE", n=0), _image("ANONYMOUS", "ROE^RICHARD", n=1), _image("ANONYMOUS", "^", n=2)]
    _write(tmp_path / "site", images)
    summary = ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    assert summary.pooled_new == 2 and dict(summary.quarantined) == {"no_patient_identity": 1}
    assert summary.identified_by_name == 2


# ---------------------------------------------------------------- issuer of patient id


def test_one_patient_id_with_and_without_its_issuer_is_one_patient_unless_the_site_has_several_issuers():
    def pseudonyms(options: DeidOptions) -> list[str]:
        return [deidentify(_image("MRN-7", issuer=issuer), KEY, options).pseudonym for issuer in (None, "HOSP_A", "")]

    bare, with_issuer, empty = pseudonyms(DeidOptions())
    assert bare == with_issuer == empty == KEY.pseudonym("|MRN-7")  # the key pools built before use
    bare, with_issuer, empty = pseudonyms(DeidOptions(several_id_issuers=True))
    assert bare == empty == KEY.pseudonym("|MRN-7") and with_issuer == KEY.pseudonym("HOSP_A|MRN-7") != bare
    assert DeidOptions().describe()["patient_identity"] != DeidOptions(several_id_issuers=True).describe()["patient_identity"]


def test_ingest_keys_a_patient_on_the_id_alone_by_default_and_on_the_issuer_when_told(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "site", [_image("MRN-7", issuer="HOSP_A", n=0), _image("MRN-7", issuer=None, n=1)])
    ingest_site("a", tmp_path / "site", tmp_path / "pool", key=KEY, progress=False)
    patients = {r["patient"] for r in _csv(ledger_folder(tmp_path / "pool", "a") / INDEX_FILE)}
    assert patients == {KEY.pseudonym("|MRN-7")}
    monkeypatch.setenv("MEDTRIAGE_SITE_SECRET", KEY_TEXT)
    argv = ["ingest", str(tmp_path / "site"), "--site", "a", "--into", str(tmp_path / "several"), "--several-id-issuers"]
    assert cli_main(argv) == 0
    patients = {r["patient"] for r in _csv(ledger_folder(tmp_path / "several", "a") / INDEX_FILE)}
    assert patients == {KEY.pseudonym("|MRN-7"), KEY.pseudonym("HOSP_A|MRN-7")}
    log = json.loads(Path(capsys.readouterr().out.split("audit log: ")[1].strip()).read_text())
    assert "issuer" in log["deidentification"]["patient_identity"].lower()


def _drop_logged_identity(pool: Path, site: str) -> None:
    """Make the site's audit logs those of an ingest from before the rule was logged (which keyed on issuer and ID)."""
    for path in (ledger_folder(pool, site) / "logs").glob("*.json"):
        log = json.loads(path.read_text())
        del log["deidentification"]["patient_identity"]
        path.write_text(json.dumps(log))


def test_a_site_ingested_keying_patients_one_way_is_not_ingested_again_the_other_way(tmp_path):
    site, pool = tmp_path / "site", tmp_path / "pool"
    _write(site, [_image("MRN-7", issuer="HOSP_A", n=0)])
    ingest_site("a", site, pool, key=KEY, progress=False, options=DeidOptions(several_id_issuers=True))
    _drop_logged_identity(pool, "a")
    _write(site, [_image("MRN-7", issuer="HOSP_A", n=0), _image("MRN-7", issuer="HOSP_A", n=1)])
    with pytest.raises(ConfigError, match="second pseudonym") as refused:
        ingest_site("a", site, pool, key=KEY, progress=False)  # the default rule would key MRN-7 anew
    assert "--several-id-issuers" in refused.value.hint
    assert {r["patient"] for r in _csv(ledger_folder(pool, "a") / INDEX_FILE)} == {KEY.pseudonym("HOSP_A|MRN-7")}
    summary = ingest_site("a", site, pool, key=KEY, progress=False, options=DeidOptions(several_id_issuers=True))
    assert summary.pooled_new == 1  # keyed as before, the new file joins its patient
    assert {r["patient"] for r in _csv(ledger_folder(pool, "a") / INDEX_FILE)} == {KEY.pseudonym("HOSP_A|MRN-7")}
    ingest_site("b", site, pool, key=KEY, progress=False)  # the default rule, logged: the other is refused the same way
    with pytest.raises(ConfigError, match="second pseudonym"):
        ingest_site("b", site, pool, key=KEY, progress=False, options=DeidOptions(several_id_issuers=True))
