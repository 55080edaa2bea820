"""Loopback ports for the servers tests start, taken outside the kernel's ephemeral range.

A port from bind(0) lies in the ephemeral range, which every outgoing connection on the machine
draws from too: between the probe closing it and the server binding it, a client connection or
another worker can take it (a listener then exits with EADDRINUSE). Ports below that range are
never given to clients; each xdist worker walks its own slice from a random start (two test
sessions at once rarely meet), and a port is offered only once a bind to it succeeds.
"""

import itertools
import os
import random
import socket

FIRST_PORT, SLICE = 20_000, 1_500  # 8 worker slices end at 32,000, below Linux's ephemeral range (32,768)


def _worker_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = FIRST_PORT + (int(worker) % 8 if worker.isdigit() else 0) * SLICE
    return range(start, start + SLICE)


_slice = _worker_slice()
_ports = itertools.islice(itertools.cycle(_slice), random.randrange(SLICE), None)


def free_port() -> int:
    """A loopback TCP port no other test of this session is using; the same port comes back only after SLICE others."""
    for port in itertools.islice(_ports, SLICE):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT
                continue
        return port
    raise RuntimeError(f"no free loopback port in {_slice.start}-{_slice.stop - 1}: close servers earlier tests left running")
