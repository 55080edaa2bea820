"""The wheelhouse without a package index: the target's platform tags, requirements that extras bring, and wheels
whose metadata is damaged, unreadable or larger than its header states (tiny wheels written here)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest

from medtriage.delivery import wheelhouse
from medtriage.delivery.wheelhouse import (
    DEFAULT_PLATFORM,
    BuildError,
    check_target,
    missing_requirements,
    target_environment,
    wheel_metadata,
)
from medtriage.errors import ConfigError
from tests.delivery.test_bundle import _wheel
from tests.memory import outcome_and_peak_bytes


@pytest.mark.parametrize("platform", ["manylinux_2_4_x86_64", "manylinux_1_9_x86_64", "manylinux_3_0_x86_64"])
def test_a_manylinux_tag_older_than_glibc_2_5_or_of_another_major_is_refused(platform):
    """manylinux_2_4 left no tag at all: pip then ran without --platform and fetched this machine's wheels."""
    with pytest.raises(ConfigError, match="unsupported platform") as refused:
        check_target("3.11", platform)
    assert refused.value.where == "--platform" and "2.5" in refused.value.hint
    assert check_target("3.11", "manylinux_2_5_x86_64") == ["manylinux_2_5_x86_64", "manylinux1_x86_64"]


def test_requirements_that_an_extra_brings_are_judged_by_the_target_python(tmp_path):
    """`cov[toml]` needs tomli on 3.10 only: pip on a newer build machine leaves it out, and so did the check."""
    wheels = [
        _wheel(tmp_path, "app", "1.0", ["cov[toml]>=7", "codecs[crc]>=0.14"]),
        _wheel(tmp_path, "cov", "7.0", ['tomli; python_full_version <= "3.11.0a6" and extra == "toml"', 'deep[more]; extra == "toml"']),
        _wheel(tmp_path, "deep", "1.0", ['leaf; extra == "more"', 'unasked; extra == "other"']),  # an extra an extra asks for
    ]
    assert missing_requirements(wheels, target_environment("3.10", DEFAULT_PLATFORM)) == ["codecs[crc]>=0.14", "leaf", "tomli"]
    assert missing_requirements(wheels, target_environment("3.12", DEFAULT_PLATFORM)) == ["codecs[crc]>=0.14", "leaf"]


def test_a_requirement_the_metadata_spells_wrongly_is_a_build_error_with_a_hint(tmp_path):
    wheel = _wheel(tmp_path, "alpha", "1.0", ["pytz (>dev)"])  # a legacy specifier some old wheels carry
    with pytest.raises(BuildError, match="requirement that cannot be read") as refused:
        missing_requirements([wheel], target_environment("3.11", DEFAULT_PLATFORM))
    assert refused.value.where == str(wheel) and refused.value.hint


def test_a_wheel_with_damaged_compressed_metadata_is_a_build_error_not_a_zlib_traceback(tmp_path):
    wheel = tmp_path / "alpha-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("alpha-1.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: alpha\nVersion: 1.0\n" + "Requires-Dist: x\n" * 200)
    data = bytearray(wheel.read_bytes())
    start = data.index(b"alpha-1.0.dist-info/METADATA") + len("alpha-1.0.dist-info/METADATA")  # the local header's name
    for at in range(start + 5, start + 40):  # the compressed stream, as a bad disk or download leaves it
        data[at] ^= 0x55
    wheel.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="cannot be read") as refused:
        wheel_metadata(wheel)
    assert refused.value.where == str(wheel) and "again" in refused.value.hint


def _understated_metadata(path: Path, size: int, method: int) -> Path:
    """A wheel whose METADATA holds `size` bytes while its central directory states 100."""
    with zipfile.ZipFile(path, "w", method) as archive, archive.open("alpha-1.0.dist-info/METADATA", "w", force_zip64=False) as entry:
        entry.write(b"Metadata-Version: 2.4\nName: alpha\nVersion: 1.0\n\n")
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            entry.write(chunk)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.index(b"PK\x01\x02") + 24, 100)  # the uncompressed size of the only entry
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2], ids=["deflate", "bzip2"])
def test_metadata_larger_than_its_header_states_is_not_unpacked_whole(tmp_path, monkeypatch, method):
    """The size check reads the header; a stream that holds more must still be cut off near the limit."""
    limit = 1 << 20
    monkeypatch.setattr(wheelhouse, "METADATA_MAX", limit)
    wheel = _understated_metadata(tmp_path / "alpha-1.0-py3-none-any.whl", 32 * limit, method)
    assert wheel.stat().st_size < limit // 8  # a small file
    refused, peak = outcome_and_peak_bytes(lambda: wheel_metadata(wheel))
    assert isinstance(refused, BuildError), refused
    assert peak < 4 * limit, f"{peak / limit:.1f} MiB unpacked"
    assert refused.where == str(wheel) and refused.hint


def test_a_wheel_whose_metadata_is_encrypted_is_a_build_error_not_a_traceback(tmp_path):
    wheel = _zip_metadata(tmp_path / "alpha-1.0-py3-none-any.whl")
    data = bytearray(wheel.read_bytes())
    data[data.index(b"PK\x01\x02") + 8] |= 0x1  # the central directory's flag: encrypted
    wheel.write_bytes(bytes(data))
    with pytest.raises(BuildError, match="encrypted") as refused:
        wheel_metadata(wheel)
    assert refused.value.where == str(wheel) and refused.value.hint


def _zip_metadata(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("alpha-1.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: alpha\nVersion: 1.0\n")
    return path
