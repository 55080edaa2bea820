"""Shared fixtures. Tests are fast by default; `slow` ones run end-to-end and still run in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
PNEUMONIA_NPZ = SAMPLES / "pneumoniamnist_28.npz"


# What only training needs. The inference side (medtriage.io, medtriage.serve) runs where none of it imports.
TRAINING_STACK = ("torch", "monai", "mlflow", "hydra", "omegaconf", "sklearn", "onnxscript", "pandas")
_BLOCKER = textwrap.dedent(
    f"""
    import sys
    class Blocker:
        blocked = {TRAINING_STACK!r}
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{{name}} is blocked: the inference side must not import it")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


@pytest.fixture(scope="session")
def run_without_training_stack():
    """`run(code)`: `code` in a fresh interpreter where importing the training stack fails (`Blocker.blocked`)."""

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture
def _leaves_no_process_state():
    """A test that changes what the process shares (environment, working folder, root log handlers, an open MLflow run)
    fails itself: in two workers, modules run side by side in an order that changes, and a leak would fail another
    module's test only in some runs."""
    before = _process_state()
    yield
    after = _process_state()
    leaked = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    if "environment" in leaked:
        was, now = leaked.pop("environment")
        leaked.update({f"${k}": (was.get(k), now.get(k)) for k in was.keys() | now.keys() if was.get(k) != now.get(k)})
    if leaked:
        pytest.fail(f"the test left process state changed (before, after): {leaked}", pytrace=False)


# Set by pytest itself or once by a library's first use (torch's OpenMP, compiler and CUDA settings; MLflow's
# telemetry), not by a test.
SET_BY_IMPORTS = {
    "PYTEST_CURRENT_TEST",
    "KMP_DUPLICATE_LIB_OK",
    "KMP_INIT_AT_FORK",
    "TORCHINDUCTOR_CACHE_DIR",
    "CUBLAS_WORKSPACE_CONFIG",
    "_MLFLOW_TELEMETRY_SESSION_ID",
}


def _process_state() -> dict:
    import logging

    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow else None
    pytest_handlers = ("LogCaptureHandler", "_LiveLoggingNullHandler", "_FileHandler", "_LiveLoggingStreamHandler")
    return {
        "environment": {k: v for k, v in os.environ.items() if k not in SET_BY_IMPORTS},
        "working folder": os.getcwd(),
        "root log handlers": [h for h in logging.getLogger().handlers if type(h).__name__ not in pytest_handlers],
        "root log level": logging.getLogger().level,
        "active MLflow run": run.info.run_id if run else None,
    }


@pytest.fixture(autouse=True)
def _pydicom_log_put_back(_leaves_no_process_state):
    """A command run in-process (`main([...])`) takes pydicom's log records over for good, as its process is its own
    (io.header_warnings.say_header_warnings); the next test gets the logger as it was, not a handler writing into this
    test's captured output."""
    import logging

    logger = logging.getLogger("pydicom")
    handlers, propagate = list(logger.handlers), logger.propagate
    yield
    logger.handlers, logger.propagate = handlers, propagate


@pytest.fixture(autouse=True)
def _isolated_mlflow(_leaves_no_process_state, tmp_path, monkeypatch):
    """No test writes into the project's mlflow.db, nor into an earlier test's: a URI set in-process by an earlier
    test (mlflow.set_tracking_uri) would win over the environment, so it is reset too once mlflow is loaded."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(uri)
    yield


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


os.environ.setdefault("TQDM_MININTERVAL", "5")

# CI (.ci/run) sets this: a test whose real peer (dcmtk, Orthanc, Chromium) is missing fails there instead of skipping.
REQUIRE_PEERS = os.environ.get("MEDTRIAGE_REQUIRE_PEERS") == "1"


def _native_program(name: str) -> str | None:
    """The first `name` on PATH that is not a Python entry point: pynetdicom installs its own `storescu`, `findscu`
    and others into every virtualenv that holds it, with options that are not dcmtk's, and any activated one puts
    them first. The peers the tests talk to (dcmtk, dicom3tools, Orthanc, Chromium, systemd) are all native."""
    for folder in filter(None, os.environ.get("PATH", "").split(os.pathsep)):
        candidate = shutil.which(name, path=folder)
        if candidate is not None and not _is_python_script(candidate):
            return candidate
    return None


def _is_python_script(path: str) -> bool:
    with open(path, "rb") as program:
        first_line = program.readline(256)
    return first_line.startswith(b"#!") and b"python" in first_line


def _need_tool(name: str, install_hint: str) -> str:
    path = _native_program(name) or (name if Path(name).is_file() else None)
    if path is None:
        message = f"{name} is not installed ({install_hint})"
        if REQUIRE_PEERS:
            pytest.fail(message + "; CI needs it: a skipped integration test is not a passed one")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def need_tool():
    """`need_tool(program, install_hint)`: the path of an external program a test talks to (dcmtk, Orthanc,
    Chromium). Missing, it skips the test locally and fails it in CI (MEDTRIAGE_REQUIRE_PEERS=1)."""
    return _need_tool


@pytest.fixture(scope="session")
def self_signed_tls(tmp_path_factory, need_tool) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and its key (PEM files), made by openssl once per run."""
    openssl = need_tool("openssl", "apt-get install openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "localhost.pem", folder / "localhost.key"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    made = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject, "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr[-300:]
    return cert, key


@pytest.fixture(scope="session")
def dicom_wsi(tmp_path_factory) -> Path:
    """The sample SVS converted to a DICOM whole-slide image (VL Whole Slide Microscopy): a folder of its files."""
    pytest.importorskip("wsidicom", reason="pip install 'medtriage[wsi]'")
    folder = tmp_path_factory.mktemp("dicom_wsi")
    # In a child process: importing wsidicomizer changes how pydicom decodes pixel data for the whole process.
    # Its tiffslide source re-encodes tiles with imagecodecs, so no system libjpeg-turbo is needed.
    convert = (
        "import sys; from wsidicomizer import WsiDicomizer; from wsidicomizer.sources import TiffSlideSource; "
        "WsiDicomizer.convert(sys.argv[1], sys.argv[2], preferred_source=TiffSlideSource)"
    )
    done = subprocess.run(
        [sys.executable, "-c", convert, str(SAMPLES / "CMU-1-Small-Region.svs"), str(folder)], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0 and "No module named 'wsidicomizer'" in done.stderr:
        pytest.skip("pip install wsidicomizer (in the dev extra)")
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture
def two_site_pool(tmp_path):
    """Two sites with different matrix sizes, 24 images each, both classes in every split."""
    import numpy as np

    from medtriage.data.manifest import PoolWriter

    rng = np.random.default_rng(0)
    writer = PoolWriter(tmp_path / "pool", ["normal", "pneumonia"])
    for site, size in (("north", 40), ("south", 23)):
        for i in range(24):
            writer.add(
                rng.random((1, size, size), dtype=np.float32),
                site=site,
                patient_id=f"{site}{i}",
                study_uid=f"s{site}{i}",
                series_uid=f"r{site}{i}",
                sop_uid=f"{site}.{i}",
                path=f"{site}/{i}.dcm",
                label=(i // 3) % 2,
                split=("train", "val", "test")[i % 3],
            )
    return writer.close()


@pytest.fixture
def no_header_warnings_said():
    """pydicom's logger without the handler an earlier command of this process installed, which remembers the
    (file, warning) pairs it said: a test of what is said starts from nothing said. Put back afterwards."""
    import logging

    from medtriage.io.header_warnings import HeaderWarnings

    logger = logging.getLogger("pydicom")
    handlers, propagate = list(logger.handlers), logger.propagate
    logger.handlers = [h for h in handlers if not isinstance(h, HeaderWarnings)]
    yield
    logger.handlers, logger.propagate = handlers, propagate


@pytest.fixture
def small_decode_limits():
    """The service's decode limits at 1 MiB of pixels while a test runs; yields what a deflated data set may then
    inflate to (17 MiB: the pixels and HEADER_BYTES)."""
    from medtriage.io.decode_limits import HEADER_BYTES, DecodeLimits, default_limits, set_default_limits

    previous = default_limits()
    set_default_limits(DecodeLimits(max_decoded_bytes=1 << 20))
    yield (1 << 20) + HEADER_BYTES
    set_default_limits(previous)
