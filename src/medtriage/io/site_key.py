"""A site's secret and everything keyed on it: patient pseudonyms, per-patient date shifts, new UIDs, accession
pseudonyms and the keyed hashes of source files. The secret itself never leaves SiteKey, and is read only from a file
its owner alone can read (or MEDTRIAGE_SITE_SECRET).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from pydicom._uid_dict import UID_dictionary  # PS3.6 Annex A as pydicom knows it; pydicom names it nowhere public

from medtriage.errors import ConfigError

SECRET_ENV = "MEDTRIAGE_SITE_SECRET"
DICOM_UID_ROOT = "1.2.840.10008."  # the standard's own root: its registered UIDs name kinds, yet anyone can append to it


def is_registered_uid(value: str) -> bool:
    """Whether `value` is a UID the DICOM standard registers (SOP classes, transfer syntaxes, coding schemes, well-known
    instances and frames of reference): not identifying. Starting with DICOM_UID_ROOT is not enough, as anybody can
    write a site's UIDs, or a name, after it; every entry of the dictionary is of valid UID syntax (PS3.5 9.1)."""
    return value.startswith(DICOM_UID_ROOT) and value in UID_dictionary


class SiteKey:
    """Everything derived from the site secret. The secret itself never leaves this object."""

    def __init__(self, secret: bytes, *, max_shift_days: int = 3650):
        if len(secret) < 16:
            raise ConfigError(
                "site secret is too short (need at least 16 bytes)",
                hint='make one with: (umask 077; python -c "import secrets; print(secrets.token_hex(32))" > site.key)',
            )
        if max_shift_days < 1:
            raise ConfigError(f"max_shift_days must be >= 1, got {max_shift_days}")
        self._secret = bytes(secret)
        self.max_shift_days = max_shift_days

    def _digest(self, purpose: str, value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        return hmac.new(self._secret, purpose.encode() + b"\0" + data, hashlib.sha256).digest()

    def pseudonym(self, patient_key: str) -> str:
        return "PT" + self._digest("patient", patient_key).hex()[:20].upper()

    def date_shift_days(self, patient_key: str) -> int:
        """Days to move this patient's dates back: 1..max_shift_days, the same on every run."""
        return 1 + int.from_bytes(self._digest("date-shift", patient_key)[:8], "big") % self.max_shift_days

    def uid(self, original: str) -> str:
        """`2.25.<int>` for any value but a registered UID (SOP classes...), which stays: one under the DICOM root
        that the standard does not register becomes one as any other does. A UID pydicom does not know yet (a class
        newer than its dictionary) is remapped too, which loses its meaning, never an identity. A private UID that
        names a kind of object (a vendor's SOP class) is kept by its attribute: deid.KIND_UID_TAGS come here only
        where they hold one of the data set's own instance UIDs, or a value that is no UID."""
        original = original.strip("\0 ")
        if not original or is_registered_uid(original):
            return original
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def accession(self, original: str) -> str:
        original = original.strip()
        return "AC" + self._digest("accession", original).hex()[:14].upper() if original else ""

    def content_key(self, data: bytes) -> str:
        """Keyed hash of a source file: an index key that reveals nothing to whoever lacks the secret."""
        return self._digest("content", data).hex()[:32]


def load_site_key(secret_file: str | Path | None = None, *, max_shift_days: int = 3650) -> SiteKey:
    """The site secret from a file (preferred) or the MEDTRIAGE_SITE_SECRET environment variable."""
    hint = (
        f'create one once and keep it at the site: (umask 077; python -c "import secrets; print(secrets.token_hex(32))" > site.key); '
        f"then pass --secret-file site.key or set {SECRET_ENV}"
    )
    if secret_file is not None:
        path = Path(secret_file)
        if not path.is_file():
            raise ConfigError("site secret file not found", where=path, hint=hint)
        _check_private(path)
        secret = path.read_bytes().strip()
    elif os.environ.get(SECRET_ENV):
        secret = os.environ[SECRET_ENV].strip().encode()
    else:
        raise ConfigError("no site secret given", hint=hint)
    return SiteKey(secret, max_shift_days=max_shift_days)


def _check_private(path: Path) -> None:
    """The secret must be readable by its owner alone: with it, anyone can confirm which patient ID gave a pseudonym
    (IDs are few enough to try them all) and undo the date shifts (ssh refuses a readable private key likewise)."""
    mode = path.stat().st_mode
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"the site secret file can be read by other users (mode {stat.S_IMODE(mode):o})",
            where=path,
            hint=f"chmod 600 {path}",
        )
