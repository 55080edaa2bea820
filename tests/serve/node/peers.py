"""Real peers for the DICOM node: Orthanc (with its DICOMweb plugin) and the `medtriage listen` process,
both on free loopback ports with their state in a temporary folder. Shared by the tests and the PACS benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom

from tests.serve.test_serve_http import free_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET, NODE_AET = "ORTHANC", "MEDTRIAGE"
STUDY_TIMEOUT = "1"  # seconds of quiet that close a study: short, so the tests stay fast
MAIN = "import sys; from medtriage.cli import main; sys.exit(main(sys.argv[1:]))"  # the `medtriage` command


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Orthanc:
    """An Orthanc server whose DicomModalities has the node as 'medtriage'. `stop()` / `start()` keep its storage."""

    def __init__(self, folder: Path, node_port: int, executable: str = "Orthanc"):
        self.folder, self.executable = folder, executable
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "medtriage-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"medtriage": [NODE_AET, "127.0.0.1", node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
            "StableAge": 1,
            "DicomThreadsCount": 4,
            "HttpThreadsCount": 8,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> Orthanc:
        with open(self.folder / "orthanc.log", "ab") as log:
            self.process = subprocess.Popen([self.executable, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._up, 30, "Orthanc to answer")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            return self.http.get("/system").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        self.http.close()

    def find(self, level: str = "Instance", **query) -> list[dict]:
        response = self.http.post("/tools/find", json={"Level": level, "Query": query, "Expand": True})
        response.raise_for_status()
        return response.json()

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.http.get(f"/instances/{orthanc_id}/file").content

    def results(self, modality: str = "SR") -> list[pydicom.Dataset]:
        """Every instance of `modality` that Orthanc holds, parsed."""
        from io import BytesIO

        return [pydicom.dcmread(BytesIO(self.instance_file(i["ID"]))) for i in self.find(Modality=modality)]

    def upload(self, path: Path) -> str:
        """Store a file in Orthanc over REST; its Orthanc instance ID."""
        response = self.http.post("/instances", content=Path(path).read_bytes())
        response.raise_for_status()
        return response.json()["ID"]


def referenced_sops(sr: pydicom.Dataset) -> list[str]:
    """SOP Instance UIDs an SR lists as its evidence."""
    return [
        sop.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


class Listener:
    """`medtriage listen` as a child process (kill -9 and restart it with the same state)."""

    def __init__(self, package: Path, state: Path, port: int, *options: str):
        self.command = [
            sys.executable,
            "-c",
            MAIN,
            "listen",
            str(package),
            "--aet",
            NODE_AET,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state",
            str(state),
            "--threads",
            "1",
            *options,
        ]
        self.port, self.state = port, state
        self.log = state.parent / f"{state.name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Listener:
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(self._echoes, timeout, "the listener to answer C-ECHO", interval=0.2)
        return self

    def _echoes(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the listener exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
        return echo(self.port)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=60)
        return self.process.returncode if self.process else 0

    def counts(self) -> dict:
        """Studies and instances by state, read from the node's SQLite store."""
        from medtriage.serve.node.store import NodeStore

        store = NodeStore(self.state)
        try:
            return store.counts()
        finally:
            store.close()


def start_listener(package_dir: Path, state: Path, port: int, orthanc: Orthanc, *options: str) -> Listener:
    """A listener that sends to `orthanc` by C-STORE unless `options` say otherwise."""
    options = options or ("--send-to", f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}")
    return Listener(package_dir, state, port, "--study-timeout", STUDY_TIMEOUT, "--retry-max", "1", *options).start()


def srs(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    """The SRs Orthanc holds for one study."""
    from io import BytesIO

    return [pydicom.dcmread(BytesIO(orthanc.instance_file(i["ID"]))) for i in orthanc.find(Modality="SR", StudyInstanceUID=study_uid)]


def wait_for_srs(orthanc: Orthanc, study_uids, timeout: float = 40) -> dict[str, list[pydicom.Dataset]]:
    wait_for(
        lambda: all(orthanc.find(Modality="SR", StudyInstanceUID=uid) for uid in study_uids),
        timeout,
        f"an SR for each of {len(study_uids)} studies in Orthanc",
        interval=0.3,
    )
    return {uid: srs(orthanc, uid) for uid in study_uids}


def echo(port: int, aet: str = NODE_AET) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


# dcmtk storescu proposes uncompressed transfer syntaxes unless told which compressed one to add.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(
    executable: str, port: int, files: list[Path], aet: str = NODE_AET, timeout: float = 120, propose: str | None = None
) -> subprocess.CompletedProcess:
    """dcmtk storescu: `files` in one association (-R: only the contexts they need; -nh: go on after a failure)."""
    return subprocess.run(
        [
            executable,
            "-aec",
            aet,
            "-aet",
            "STORESCU",
            "-R",
            "-nh",
            *([propose] if propose else []),
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def storescu_by_syntax(executable: str, port: int, files: list[Path], aet: str = NODE_AET) -> list:
    """One storescu run per transfer syntax, proposing that syntax, so compressed files go as they are."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(syntax, []).append(path)
    return [storescu(executable, port, group, aet, propose=STORESCU_PROPOSE.get(syntax)) for syntax, group in groups.items()]


def copy_tree(source: Path, target: Path) -> Path:
    return Path(shutil.copytree(source, target))


# --- test data: real chest X-rays (PneumoniaMNIST) as small CR studies ------------------------------

NPZ = Path(__file__).resolve().parents[3] / "data" / "samples" / "pneumoniamnist_28.npz"
_IMAGES: list = []


def cr_study(folder: Path, instances: int, seed: int, patient: str = "PSEUDO-1", size: int = 28) -> list[Path]:
    """`instances` CR files of one new study (one image each, from PneumoniaMNIST's test split, enlarged
    to `size` pixels a side by pixel repetition when `size` is a multiple of 28)."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not _IMAGES:
        _IMAGES.append(np.load(NPZ)["test_images"])
    images = _IMAGES[0]
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for k in range(instances):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, "Pseudo^One", "", "O"
        ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = f"ACC{seed:05d}", str(seed), "20240102", "101010"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", "CR", 1, k + 1
        ds.BodyPartExamined, ds.StudyDescription = "CHEST", "Chest X-ray"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", size, size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        image = images[(seed * 97 + k) % len(images)].astype(np.uint8)
        ds.PixelData = np.kron(image, np.ones((size // 28, size // 28), np.uint8)).tobytes()
        path = folder / f"{seed:03d}-{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send_files(port: int, paths: list[Path], aet: str = NODE_AET, stop_after=None) -> dict[Path, int | None]:
    """pynetdicom C-STORE SCU, one association: each file's response status (None: no response came)."""
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    for sop_class, syntax in {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}:
        ae.add_requested_context(sop_class, syntax)  # one context per syntax: each file goes as it is
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    statuses: dict[Path, int | None] = dict.fromkeys(paths)
    if not assoc.is_established:
        return statuses
    try:
        for path in paths:
            if not assoc.is_established:
                break
            try:
                status = assoc.send_c_store(path)
            except Exception:  # noqa: BLE001 -- the peer went away mid-association
                break
            statuses[path] = getattr(status, "Status", None)
            if stop_after is not None:
                stop_after(path, statuses[path])
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
