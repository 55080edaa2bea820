"""A new project's MLflow store, first opened by several trainings at once (two terminals, a sweep's jobs, the fold
runs of a cross-validation) must come out as one store with one experiment, whoever gets there first."""

from __future__ import annotations

import multiprocessing

import mlflow

from medtriage.training.tracking import experiment_id

RACERS = 4
ROUNDS = 5  # one race on a new store rarely collides (the processes start apart): several make a collision near certain


def _race(uris: list[str], barrier, results) -> None:
    for uri in uris:
        barrier.wait()  # every process opens the new store at the same moment
        try:
            results.put((uri, "ok", experiment_id(uri, "medtriage-race")))
        except Exception as error:  # reported to the test, which shows it
            results.put((uri, "error", repr(error)))


def test_processes_opening_a_new_store_at_once_share_one_experiment(tmp_path):
    uris = [f"sqlite:///{tmp_path / f'store{i}' / 'mlflow.db'}" for i in range(ROUNDS)]
    context = multiprocessing.get_context("forkserver")  # each racer a fresh process, forked from one clean server
    context.set_forkserver_preload([__name__])  # that imports this module once for all of them, not once each
    barrier, results = context.Barrier(RACERS), context.Queue()
    racers = [context.Process(target=_race, args=(uris, barrier, results)) for _ in range(RACERS)]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=300) for _ in range(RACERS * ROUNDS)]
    for racer in racers:
        racer.join(timeout=60)
    assert [error for _, kind, error in outcomes if kind != "ok"] == []
    for uri in uris:
        assert len({value for store, _, value in outcomes if store == uri}) == 1, outcomes
        experiments = mlflow.MlflowClient(uri).search_experiments()
        assert [e.name for e in experiments if e.name != "Default"] == ["medtriage-race"]
