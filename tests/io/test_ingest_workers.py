"""Ingest with worker processes: inputs are handed out a few at a time, not all at once (each outcome carries a
de-identified file's bytes, and those after one slow file would wait in memory), and outcomes keep input order."""

from __future__ import annotations

from medtriage.io.deid import DeidOptions
from medtriage.io.ingest import IN_FLIGHT_PER_WORKER, _map
from medtriage.io.ingest_file import DEFAULT_MAX_FILE_BYTES
from medtriage.io.site_folder import read_site_folder
from medtriage.io.site_key import SiteKey
from tests.io.phi_site import build_phi_site

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
INIT_ARGS = (KEY, DeidOptions(), frozenset(), True, DEFAULT_MAX_FILE_BYTES, False)


class CountedSources(list):
    """The site's inputs, counting how many have been taken."""

    taken = 0

    def __iter__(self):
        for source in super().__iter__():
            self.taken += 1
            yield source


def _seen(out) -> tuple:
    return out.source, out.status, out.reason, out.sop_uid, out.pixel_sha256, out.encoded


def test_workers_are_handed_a_window_of_inputs_and_give_outcomes_in_input_order(tmp_path):
    build_phi_site(tmp_path / "site")
    workers, sources = 2, CountedSources(str(p) for p in read_site_folder(tmp_path / "site").inputs)
    window = IN_FLIGHT_PER_WORKER * workers
    assert len(sources) > window + 1
    outcomes = _map(sources, workers, False, "site_a", INIT_ARGS)
    first = next(outcomes)
    taken_at_first = sources.taken
    parallel = [first, *outcomes]
    assert taken_at_first <= window
    assert [out.source for out in parallel] == list(sources)
    serial = _map(list(sources), 1, False, "site_a", INIT_ARGS)
    assert [_seen(out) for out in parallel] == [_seen(out) for out in serial]
