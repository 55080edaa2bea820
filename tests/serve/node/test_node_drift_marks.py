"""The worklist of `medtriage serve --state DIR` marks the rows of a source the DICOM node writing DIR finds
drifting: the node's drift monitor runs in its own process, so what it finds is shared through the state folder."""

from medtriage.serve.node.header import read_identity
from medtriage.serve.node.store import NodeStore
from medtriage.serve.node.worker import Worker
from medtriage.serve.worklist import Worklist
from tests.serve.node.peers import cr_study
from tests.serve.test_worklist_rows import flag_drift


def receive(store: NodeStore, path, calling_aet: str) -> None:
    header = read_identity(path)
    store.receive(path.read_bytes(), header.sop_uid, header.study_uid, header.series_uid, header.sop_class, header.fields, calling_aet)


def test_rows_of_a_source_the_node_finds_drifting_are_marked_by_the_serving_process(safe_predictor, tmp_path):
    folder = tmp_path / "state"
    node_store = NodeStore(folder, recover=True)
    worker = Worker(node_store, safe_predictor, destinations=[], study_timeout=60)
    drifting_room, calm_room = (cr_study(tmp_path / name, 1, seed=seed)[0] for seed, name in enumerate(("a", "b")))
    flag_drift(worker.monitor, "CR ROOM_2")  # what the node has seen from that modality so far
    receive(node_store, drifting_room, "CR ROOM/2")
    receive(node_store, calm_room, "CR_ROOM_1")
    worker.score_queued()

    served = Worklist(safe_predictor, store=NodeStore(folder))  # the serving process: its own connection and monitor
    marks = {row["source"]: row["source_drifting"] for row in served.rows()}
    assert marks == {"CR ROOM_2": True, "CR_ROOM_1": False}

    node_store.close()
    NodeStore(folder, recover=True).close()  # the node restarts: its drift windows start empty
    assert not any(row["source_drifting"] for row in served.rows())


def test_a_source_that_stops_drifting_loses_its_mark(tmp_path):
    store = NodeStore(tmp_path / "state")
    store.mark_drifting("CR_ROOM_1", True)
    store.mark_drifting("CR_ROOM_1", True)  # still drifting: the first time it was seen drifting is kept
    assert store.drifting_sources() == {"CR_ROOM_1"}
    store.mark_drifting("CR_ROOM_1", False)
    assert store.drifting_sources() == set()
