"""scripts/slurm/train.sbatch as SLURM runs it: fake `srun` and `scontrol` on PATH record what the script asks of the
cluster; the run folder each job trains into, and what a requeued job continues, are read from srun's arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser

from medtriage.config import compose_train_config
from medtriage.export.registry import PACKAGE_LOGGED, PACKAGE_STATE_TAG, PACKAGE_WRITING, artifact_path
from medtriage.model.checkpoint import LAST, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
PINNED = "hydra.run.dir=${paths.runs_dir}/${name}/slurm-"

FAKE_SRUN = '#!/bin/bash\nprintf "%s\\0" "$@" > "$FAKE_SRUN_ARGS"\n'
FAKE_SCONTROL = """#!/bin/bash
printf "%s\\0" "$@" > "$FAKE_SCONTROL_ARGS"
printf "node-a\\nnode-b\\n"
seq -f "node-%g" "${FAKE_MORE_NODES:-0}"
"""


def _submit_dir(tmp_path: Path) -> Path:
    """A checkout as sbatch sees it: configs/ (the project root is found by it) and a venv to activate. The space in
    its name checks that paths reach Hydra intact."""
    submit = tmp_path / "submit dir"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    (submit / "configs").symlink_to(ROOT / "configs")
    return submit


def _sbatch(tmp_path: Path, *args: str, **start) -> tuple[list[str], str]:
    """(overrides srun passed on to scripts/train.py, the script's stderr) of one start of the job."""
    srun, stderr = _start(tmp_path, *args, **start)
    assert (tmp_path / "scontrol.args").read_text().split("\0")[:-1] == ["show", "hostnames", "node-[a-b]"]
    assert srun[:2] == ["--kill-on-bad-exit=1", "torchrun"] and "--rdzv_endpoint=node-a:29500" in srun
    return srun[srun.index("scripts/train.py") + 1 :], stderr


def _start(
    tmp_path: Path, *args: str, restarts: int = 0, array_task: int | None = None, more_nodes: int = 0, exits: int = 0
) -> tuple[list[str] | None, str]:
    """(the arguments of the job's srun, None when it ran none; the script's stderr) of one start of the job."""
    fakes = tmp_path / "fakes"
    fakes.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "MEDTRIAGE_ROOT"}
    env.update(
        PATH=f"{fakes}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        FAKE_SRUN_ARGS=str(tmp_path / "srun.args"),
        FAKE_SCONTROL_ARGS=str(tmp_path / "scontrol.args"),
        SLURM_SUBMIT_DIR=str(tmp_path / "submit dir"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="32",
        SLURM_RESTART_COUNT=str(restarts),
        FAKE_MORE_NODES=str(more_nodes),
    )
    if array_task is not None:
        env.update(SLURM_ARRAY_JOB_ID="4000", SLURM_ARRAY_TASK_ID=str(array_task))
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == exits, done.stderr
    srun = tmp_path / "srun.args"
    return (srun.read_text().split("\0")[:-1] if srun.exists() else None), done.stderr


def _value(overrides: list[str], key: str) -> str:
    """The value Hydra reads from the one override of `key`."""
    (value,) = [OverridesParser.create().parse_override(o).value() for o in overrides if o.startswith(f"{key}=")]
    return value


def test_a_first_start_trains_into_a_folder_named_by_its_job(tmp_path):
    _submit_dir(tmp_path)
    overrides, _ = _sbatch(tmp_path)
    assert overrides == ["trainer=gpu", "experiment=pneumonia_sites", PINNED + "4242"]
    overrides, _ = _sbatch(tmp_path, "experiment=pneumoniamnist", array_task=7)  # an array task: its own folder
    assert overrides == ["trainer=gpu", "experiment=pneumoniamnist", PINNED + "4000_7"]


def test_a_job_on_many_nodes_finds_its_head_node(tmp_path):
    """More host names than a pipe holds: `scontrol ... | head -n 1` under pipefail failed the job (SIGPIPE)."""
    _submit_dir(tmp_path)
    overrides, _ = _sbatch(tmp_path, more_nodes=200_000)
    assert overrides[0] == "trainer=gpu"


def test_a_job_requeued_before_its_first_checkpoint_starts_afresh(tmp_path):
    """trainer.resume=true would fail there (no unfinished run has a checkpoint), or continue another job's run."""
    submit = _submit_dir(tmp_path)
    other = submit / "outputs" / "pneumonia_sites" / "slurm-4000_2" / "checkpoints"
    other.mkdir(parents=True)
    (other / "last.pt").write_bytes(b"")  # another array task's: not this one's to continue
    overrides, stderr = _sbatch(tmp_path, restarts=1, array_task=3)
    assert overrides == ["trainer=gpu", "experiment=pneumonia_sites", PINNED + "4000_3"]
    folder = submit / "outputs" / "pneumonia_sites" / "slurm-4000_3"
    assert f"no checkpoint in {folder}/checkpoints" in stderr and "starts afresh" in stderr


def test_a_requeued_job_continues_its_own_run_from_its_last_checkpoint(tmp_path):
    submit = _submit_dir(tmp_path)
    folder = submit / "outputs" / "pneumonia_sites" / "slurm-4000_3"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.pt").write_bytes(b"")
    overrides, _ = _sbatch(tmp_path, restarts=2, array_task=3)
    assert overrides[:3] == ["trainer=gpu", "experiment=pneumonia_sites", PINNED + "4000_3"]
    assert _value(overrides, "trainer.resume_from") == str(folder) and len(overrides) == 4


def test_a_given_run_folder_is_kept_and_continued(tmp_path):
    submit = _submit_dir(tmp_path)
    overrides, _ = _sbatch(tmp_path, "experiment=pneumoniamnist", "hydra.run.dir=runs/mine")
    assert overrides == ["trainer=gpu", "experiment=pneumoniamnist", "hydra.run.dir=runs/mine"]
    (submit / "runs" / "mine" / "checkpoints").mkdir(parents=True)
    (submit / "runs" / "mine" / "checkpoints" / "last.pt").write_bytes(b"")
    overrides, _ = _sbatch(tmp_path, "experiment=pneumoniamnist", "hydra.run.dir=runs/mine", restarts=1)
    assert overrides[:3] == ["trainer=gpu", "experiment=pneumoniamnist", "hydra.run.dir=runs/mine"]
    assert _value(overrides, "trainer.resume_from") == str(submit / "runs" / "mine") and len(overrides) == 4


def test_a_requeued_job_that_names_the_run_to_resume_continues_that_run(tmp_path):
    _submit_dir(tmp_path)
    asked = ["experiment=pneumoniamnist", "trainer.resume_from=outputs/pneumoniamnist/slurm-1234"]
    overrides, stderr = _sbatch(tmp_path, *asked, restarts=1)
    assert overrides == ["trainer=gpu", *asked, PINNED + "4242"]
    assert "continuing the run its trainer.resume/trainer.resume_from override names" in stderr


def _finished_run(folder: Path, run_id: str) -> None:
    """A run folder as training leaves it once finished: checkpoints, then metrics.json."""
    save_checkpoint(folder / "checkpoints" / LAST, mlflow_run_id=run_id, epoch=3)
    (folder / "metrics.json").write_text('{"test/auc": 0.9}')


def test_a_job_requeued_while_it_exported_exports_its_finished_run_again(tmp_path):
    """trainer.resume_from=<a finished run> is refused: the requeued job failed, and the model was never exported."""
    submit = _submit_dir(tmp_path)
    _finished_run(submit / "outputs" / "pneumonia_sites" / "slurm-4000_3", run_id="5e1f")
    srun, stderr = _start(tmp_path, restarts=1, array_task=3)
    assert srun == ["--nodes=1", "--ntasks=1", "python", "scripts/export.py", "run_id=5e1f"]
    assert "finished training; exporting MLflow run 5e1f again" in stderr


def test_a_requeued_job_whose_finished_run_exports_nothing_ends_with_nothing_to_do(tmp_path):
    submit = _submit_dir(tmp_path)
    _finished_run(submit / "outputs" / "pneumonia_sites" / "slurm-4242", run_id="5e1f")
    srun, stderr = _start(tmp_path, "experiment=pneumonia_sites", "export.enabled=false", restarts=1)
    assert srun is None and "its config exports nothing: done" in stderr


PACKAGE = compose_train_config(["experiment=pneumonia_sites", "paths.output_dir=."]).export.name


def _exported_run(folder: Path, state: str = PACKAGE_LOGGED) -> str:
    """A finished run in `folder` whose export logged v1 of its package to its MLflow run and registered it (`state`:
    the version's tag, `writing` until the package is logged); its MLflow run id."""
    client = mlflow.MlflowClient()
    run_id = client.create_run("0").info.run_id
    client.set_tag(run_id, "medtriage.package", f"{PACKAGE} v1 sha256 0123abcd")
    client.create_registered_model(PACKAGE)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path(1, PACKAGE)}"
    client.create_model_version(PACKAGE, source=source, run_id=run_id, tags={PACKAGE_STATE_TAG: state})
    _finished_run(folder, run_id)
    return run_id


def test_a_job_requeued_once_its_export_completed_does_nothing(tmp_path):
    """Exporting again would register and serve a second version of the same model (SLURM requeues a job whose node
    failed after it had finished, or `scontrol requeue` of a finished job)."""
    submit = _submit_dir(tmp_path)
    run_id = _exported_run(submit / "outputs" / "pneumonia_sites" / "slurm-4000_3")
    srun, stderr = _start(tmp_path, restarts=1, array_task=3)
    assert srun is None
    assert f"MLflow run {run_id} was exported already ({PACKAGE} v1" in stderr and "nothing to do" in stderr


def test_a_job_requeued_before_its_export_registered_its_package_exports_again(tmp_path):
    """A version tagged `writing` has no package behind it: the export was stopped before it completed."""
    submit = _submit_dir(tmp_path)
    run_id = _exported_run(submit / "outputs" / "pneumonia_sites" / "slurm-4000_3", state=PACKAGE_WRITING)
    srun, stderr = _start(tmp_path, restarts=1, array_task=3)
    assert srun == ["--nodes=1", "--ntasks=1", "python", "scripts/export.py", f"run_id={run_id}"]
    assert f"exporting MLflow run {run_id} again" in stderr


def test_a_job_requeued_once_its_unlogged_export_completed_does_nothing(tmp_path):
    """export.log_to_mlflow=false: the package on disk, naming the run, is the export's only record."""
    submit = _submit_dir(tmp_path)
    _finished_run(submit / "outputs" / "pneumonia_sites" / "slurm-4000_3", run_id="5e1f")
    unlogged = ("experiment=pneumonia_sites", "export.log_to_mlflow=false")
    srun, _ = _start(tmp_path, *unlogged, restarts=1, array_task=3)  # no package yet: the export was stopped
    assert srun == ["--nodes=1", "--ntasks=1", "python", "scripts/export.py", "run_id=5e1f"]
    (tmp_path / "srun.args").unlink()
    package = submit / "models" / PACKAGE
    package.mkdir(parents=True)
    (package / "model.json").write_text(json.dumps({"name": PACKAGE, "version": 2, "provenance": {"mlflow_run_id": "5e1f"}}))
    srun, stderr = _start(tmp_path, *unlogged, restarts=1, array_task=3)
    assert srun is None and f"MLflow run 5e1f was exported already ({PACKAGE} v2" in stderr


def test_a_run_folder_named_by_the_time_is_refused_before_anything_starts(tmp_path):
    """Each torchrun process, on each node, and each requeue resolves ${now:...} to its own second: its own folder."""
    _submit_dir(tmp_path)
    srun, stderr = _start(tmp_path, "hydra.run.dir=runs/${now:%Y-%m-%d_%H-%M-%S}", exits=2)
    assert srun is None and "name it without ${now:...}" in stderr
