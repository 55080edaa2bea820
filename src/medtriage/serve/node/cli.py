"""`medtriage listen`: run the DICOM node until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import tempfile
import threading
from urllib.parse import urlsplit

from medtriage.arguments import path, path_as_typed, positive_float, positive_int, refuse_file_as_folder
from medtriage.errors import printable
from medtriage.io.header_warnings import say_header_warnings
from medtriage.serve.batching import add_batching_options
from medtriage.serve.cli import add_runtime_options, apply_decode_limits
from medtriage.serve.node.store import ASSOCIATE_WITHIN_S, MAX_ASSOCIATIONS, MAX_INSTANCE_BYTES, MIN_FREE_BYTES

LISTEN_HELP = """\
Receive images from a PACS or modality (DICOM C-STORE), score each study with the model package and
send one DICOM SR per study back (C-STORE to --send-to and/or STOW-RS to --dicomweb).

Every received instance is written to --state before the sender is told it arrived; a restart
resumes unfinished work, and an instance sent twice gives one result. The worklist page shows the
same state: medtriage serve PACKAGE --state DIR.
"""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LINE_START = re.compile(r"^", re.MULTILINE)  # where to indent each line of a traceback


class OneLinePerRecord(logging.Formatter):
    """Each record's message on one line, its control characters shown as escapes, and the lines of a traceback
    indented: messages quote values a peer sent (pynetdicom quotes a refused AE title as it came), and a line break in
    one would start a line of the node's log that reads as a record of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        return super().formatMessage(logging.makeLogRecord({**record.__dict__, "message": printable(record.message)}))

    def format(self, record: logging.LogRecord) -> str:
        head, newline, traceback = super().format(record).partition("\n")  # only a traceback, or a stack, follows
        return head + newline + _LINE_START.sub("  ", traceback)


def node_log_handler(stream) -> logging.Handler:
    """The handler of the node's log: records on `stream`, one line each (OneLinePerRecord)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLinePerRecord(LOG_FORMAT))
    return handler


def register(subparsers) -> None:
    listen = subparsers.add_parser(
        "listen",
        help="run a DICOM node: receive studies, score them, send SRs back",
        description=LISTEN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listen.add_argument("package", type=path, help="model package folder, e.g. models/pneumonia-sites-r18")
    listen.add_argument("--aet", default="MEDTRIAGE", help="this node's AE title (default: MEDTRIAGE)")
    listen.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    listen.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default: 11112)")
    listen.add_argument("--send-to", metavar="AET@HOST:PORT", help="where results go by C-STORE, e.g. ORTHANC@pacs.example.org:4242")
    listen.add_argument(
        "--dicomweb",
        metavar="URL",
        help="also (or instead) store results by STOW-RS at this DICOMweb root, e.g. http://pacs:8042/dicom-web",
    )
    listen.add_argument(
        "--state",
        required=True,
        metavar="DIR",
        type=path,
        help="folder for the received instances, the queue (SQLite) and the results waiting to go",
    )
    listen.add_argument(
        "--allow-aet", nargs="+", metavar="AET", default=None, help="accept associations only from these calling AE titles (default: any)"
    )
    listen.add_argument(
        "--tls-cert", metavar="PEM", type=path_as_typed, help="serve DICOM over TLS with this certificate (needs --tls-key)"
    )
    listen.add_argument("--tls-key", metavar="PEM", type=path_as_typed, help="the private key of --tls-cert")
    listen.add_argument(
        "--study-timeout",
        type=positive_float,
        default=10.0,
        metavar="SECONDS",
        help="a study is complete after this many seconds without a new instance (default: 10)",
    )
    listen.add_argument(
        "--heatmaps", action="store_true", help="also send a Secondary Capture per study: the most urgent image with where the model looked"
    )
    listen.add_argument(
        "--retry-max",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait between delivery retries; results wait until delivered (default: 60)",
    )
    listen.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics (counts, latency, drift per calling AE title) at http://HOST:PORT/metrics (default: off)",
    )
    listen.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics endpoint (default: 127.0.0.1, this machine only)",
    )
    listen.add_argument(
        "--max-instance-bytes",
        type=int,
        default=MAX_INSTANCE_BYTES,
        metavar="BYTES",
        help=f"refuse a larger instance with status 0xA700, out of resources (default: {MAX_INSTANCE_BYTES}); instances "
        "arrive on disk under STATE/incoming, never whole in memory",
    )
    listen.add_argument(
        "--min-free-bytes",
        type=int,
        default=MIN_FREE_BYTES,
        metavar="BYTES",
        help=f"refuse instances with status 0xA700 while the state folder's disk has less free (default: {MIN_FREE_BYTES}): "
        "senders retry later, and results, database and logs keep room",
    )
    listen.add_argument(
        "--max-associations",
        type=positive_int,
        default=MAX_ASSOCIATIONS,
        metavar="N",
        help=f"serve this many connections at once; one more is refused until one ends (default: {MAX_ASSOCIATIONS})",
    )
    listen.add_argument(
        "--associate-timeout",
        type=positive_float,
        default=ASSOCIATE_WITHIN_S,
        metavar="SECONDS",
        help="close a connection that has not sent its whole association request (TLS handshake included) this long "
        f"after connecting, freeing its place; an association once open is not affected (default: {ASSOCIATE_WITHIN_S:g})",
    )
    add_runtime_options(listen, out_of_scope_help="(results are flagged); by default such images are 'not analysed' and get no SR")
    add_batching_options(listen, at_once="N queued instances are then decoded at once")
    listen.set_defaults(func=run_listen)


def check_network_options(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, values that would fail later with a traceback (an AE title pynetdicom refuses,
    a port out of range, a URL without a scheme) or spin (retries without a wait)."""
    from medtriage.errors import ConfigError
    from medtriage.serve.node.sender import check_port, is_ae_title

    for option, title in [("--aet", args.aet), *(("--allow-aet", t) for t in args.allow_aet or [])]:
        if not is_ae_title(title):
            raise ConfigError(
                f"{title!r} is not an AE title", where=option, hint="1 to 16 ASCII characters, no backslash or control character"
            )
    for option, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if port is not None:
            check_port(port, where=option)
    if not 1 <= args.retry_max < float("inf"):  # nan too
        raise ConfigError(
            f"--retry-max must be a finite number of at least 1 second, got {args.retry_max}",
            where="--retry-max",
            hint="a shorter wait retries a down destination without pause",
        )
    url = urlsplit(args.dicomweb or "http://unset")
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(f"cannot read the DICOMweb root {args.dicomweb!r}", where="--dicomweb", hint="e.g. http://pacs:8042/dicom-web")


def run_listen(args: argparse.Namespace) -> int:
    from medtriage.errors import ConfigError
    from medtriage.serve.node.node import Node, NodeConfig
    from medtriage.serve.node.sender import Peer

    if not args.send_to and not args.dicomweb:
        raise ConfigError(
            "no destination for the results", where="medtriage listen", hint="give --send-to AET@HOST:PORT and/or --dicomweb URL"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("TLS needs both a certificate and its key", where="--tls-cert/--tls-key")
    if args.max_instance_bytes < 1:
        raise ConfigError(f"--max-instance-bytes must be positive, got {args.max_instance_bytes}", where="--max-instance-bytes")
    if args.min_free_bytes < 0:
        raise ConfigError(f"--min-free-bytes must be 0 or more, got {args.min_free_bytes}", where="--min-free-bytes")
    check_network_options(args)
    refuse_file_as_folder(args.state, "--state")
    apply_decode_limits(args)
    config = NodeConfig(
        package=args.package,
        state=args.state,
        aet=args.aet,
        host=args.host,
        port=args.port,
        send_to=Peer.parse(args.send_to) if args.send_to else None,
        dicomweb=args.dicomweb,
        allowed_callers=args.allow_aet,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        study_timeout=args.study_timeout,
        heatmaps=args.heatmaps,
        retry_max=args.retry_max,
        provider=args.provider,
        threads=args.threads,
        allow_out_of_scope=args.allow_out_of_scope,
        reduced_j2k=args.reduced_j2k,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_instance_bytes=args.max_instance_bytes,
        min_free_bytes=args.min_free_bytes,
        max_associations=args.max_associations,
        associate_timeout=args.associate_timeout,
    )
    logging.basicConfig(level=logging.INFO, handlers=[node_log_handler(sys.stderr)])
    say_header_warnings(LOG_FORMAT)  # pydicom's, as the node's own lines, once per file and naming it
    for chatty in ("pynetdicom", "highdicom"):  # one line per PDU / copied module otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    node = Node(config)
    # pynetdicom writes each arriving instance to a temporary file (serve/node/scp.py): this process's temporary files
    # go to the store's own folder, on the spool's disk, not to a /tmp that may be RAM.
    tempfile.tempdir = str(node.store.incoming)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node.start()
    print(
        f"listening as {config.aet} on port {config.port}: {node.predictor.package.describe()}; results to "
        f"{', '.join(node.destinations)}; state in {config.state}",
        file=sys.stderr,
        flush=True,
    )
    while not stop.wait(0.5):  # a short wait, so the signal handler runs promptly
        pass
    node.stop()
    return 0
