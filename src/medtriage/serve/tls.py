"""Server-side TLS for the HTTP service and the DICOM node: one check that a certificate and its key load."""

from __future__ import annotations

import ssl
from pathlib import Path

from medtriage.errors import ConfigError


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """Server-side TLS (TLS 1.2 or newer) with this certificate (chain) and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as err:  # a missing file, not PEM, or a key that is not the certificate's
        raise ConfigError(
            f"cannot load the TLS certificate {cert} with its key {key}: {err}",
            where="--tls-cert/--tls-key",
            hint="give PEM files, the key matching the certificate",
        ) from err
    return context
