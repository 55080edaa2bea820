"""Root bound by file modes, as every other user is: root passes over them (it enters a closed folder and removes the
files of a read-only one), so tests of what a user meets there drop the capabilities that let it. The process stays
root, the owner of the checkout and its virtual environment, which another user (nobody) may not be able to read: a
clone in a folder only root may open (mktemp -d) is one."""

from __future__ import annotations

import ctypes

# linux/capability.h: the capabilities that override file modes, and the header version of capget/capset
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 1, 2, 3
CAPABILITY_VERSION_3 = 0x20080522
# For a command run under root: it starts without them (setpriv is util-linux's)
WITHOUT_MODE_OVERRIDES = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Sets(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_mode_overrides() -> None:
    """This process loses the capabilities that pass over file modes, for good (call it in a forked child)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = _Header(CAPABILITY_VERSION_3, 0), (_Sets * 2)()
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH) | (1 << CAP_FOWNER)) & 0xFFFFFFFF
    for name in ("effective", "permitted", "inheritable"):
        setattr(sets[0], name, getattr(sets[0], name) & keep)  # all three are below 32: the first word
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
