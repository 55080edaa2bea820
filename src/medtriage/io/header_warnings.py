"""What pydicom says about a file's header, said once per file and naming the file.

pydicom reports a damaged header ("Expected explicit VR, but found implicit VR", a value too long for its VR) twice,
as a record of its `pydicom` logger and as a Python warning, and names neither the file nor the sender. A service
reads one file several times (its identity on arrival, its pixels to score it, its header again for the results):
each read would say it again. `reading(where)` marks the file a thread is reading (every reader of untrusted DICOM
enters it, through `io.clamped.dicom_source` and `io.dicom.read_dicom`), and `say_header_warnings` prints pydicom's
records with that name in front, each (file, message) once, and silences pydicom's copies as Python warnings.

pydicom also logs each decoding plugin that fails on a frame, with its traceback, before it tries the next one (and
io.dicom tries imagecodecs after them all). Those records are not said: where a later decoder reads the frame nothing
went wrong, and where none does, the file's DicomError names every plugin's reason.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from medtriage.errors import printable

PYDICOM = "pydicom"
PLUGIN_ATTEMPTS = "pydicom.pixels."  # the loggers of pydicom's decoder and encoder runners, which log each failed plugin
_current = threading.local()


@contextmanager
def reading(where: str) -> Iterator[None]:
    """Within this block, pydicom's records on this thread are about `where` (the innermost block's)."""
    outer = getattr(_current, "where", None)
    _current.where = where
    try:
        yield
    finally:
        _current.where = outer


def file_being_read() -> str | None:
    return getattr(_current, "where", None)


class HeaderWarnings(logging.StreamHandler):
    """Writes pydicom's records to whatever sys.stderr is when they come (a redirected stream, a test's capture), with
    the file being read in front, each (file, message) once within `window` seconds: the reads of one file follow each
    other closely, while a service may see a file of the same name again later (another upload called image.dcm),
    which is said again. At most `remember` pairs are kept. A file name (an upload's, a sender's) and the header values
    pydicom quotes are untrusted: their control characters are shown as escapes."""

    def __init__(self, window: float = 60.0, remember: int = 4096):
        super().__init__()
        self._said: OrderedDict[tuple[str | None, str], float] = OrderedDict()  # oldest first
        self._window, self._remember = window, remember
        self._lock = threading.Lock()
        self.setLevel(logging.WARNING)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith(PLUGIN_ATTEMPTS):
            return False  # one plugin of several failed: the decode's outcome says whether that mattered
        said = (file_being_read(), record.getMessage())  # records are handled on the thread that logs them
        now = time.monotonic()
        with self._lock:
            while self._said and (len(self._said) >= self._remember or now - next(iter(self._said.values())) >= self._window):
                self._said.popitem(last=False)
            if said in self._said:
                return False
            self._said[said] = now
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=sys.stderr):  # a progress bar there (ingest's) is cleared, then drawn below
            super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        where, message = file_being_read(), record.getMessage()
        named = printable(message if where is None else f"{where}: {message}")
        # the message alone, on one line: a traceback of pydicom's insides tells the user nothing they can act on
        alone = {**record.__dict__, "msg": named, "args": None, "exc_info": None, "exc_text": None, "stack_info": None}
        return super().format(logging.makeLogRecord(alone))


def saying_header_warnings() -> bool:
    """Whether say_header_warnings is in effect in this process (a worker process started afresh inherits nothing)."""
    return any(isinstance(h, HeaderWarnings) for h in logging.getLogger(PYDICOM).handlers)


def say_header_warnings(fmt: str = "warning: %(message)s") -> None:
    """Print pydicom's warnings on stderr as `fmt` says, each once per file and naming it; its Python warnings, the
    same messages again, are silenced. Idempotent: a second call changes only the format."""
    logger = logging.getLogger(PYDICOM)
    handler = next((h for h in logger.handlers if isinstance(h, HeaderWarnings)), None)
    if handler is None:
        handler = HeaderWarnings()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt))
    logger.propagate = False  # a service's own log handler would print each record a second time
    warnings.filterwarnings("ignore", category=UserWarning, module=PYDICOM)
