"""The DICOMweb sender starts without pydicom's deprecation warning about dicomweb_client's imports: the node logged
one at every start, in the hospital's journal, about code that is not its own."""

from __future__ import annotations

import subprocess
import sys

START = """
import logging, sys, warnings
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
warnings.simplefilter("default")
from medtriage.serve.node.sender import DicomWebSender
DicomWebSender("http://127.0.0.1:9/dicom-web")
logging.getLogger("pydicom").warning("pydicom still logs its own warnings")
"""


def test_a_dicomweb_sender_starts_without_pydicoms_deprecation_warnings():
    run = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, timeout=120, check=True)
    assert "deprecated" not in run.stderr
    assert "pydicom still logs its own warnings" in run.stderr  # the filter is gone once the import is done
