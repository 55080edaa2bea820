"""The damage helpers the reader tests rely on: seeded copies, and a check that reports what escaped untyped."""

import pytest

from tests.io.damage import mutations, replaced, untyped_failures, with_vr


def test_damaged_copies_are_seeded_and_differ_from_the_file():
    raw = bytes(range(256)) * 8
    first, again = list(mutations(raw, 20, seed=3)), list(mutations(raw, 20, seed=3))
    assert first == again and all(copy != raw for copy in first)


def test_an_untyped_error_is_reported_and_a_typed_one_is_not():
    def read(data: bytes) -> None:
        if data == b"typed":
            raise ValueError("refused")
        if data == b"escaped":
            raise KeyError("internal")

    assert untyped_failures([b"fine", b"typed", b"escaped"], read, ValueError) == ["KeyError: 'internal'"]


def test_an_element_relabelled_or_a_value_overwritten_changes_those_bytes_only():
    raw = b"\x08\x00\x60\x00CS\x02\x00CT" + b"\x10\x00\x10\x00PN\x04\x00AB^C"
    assert with_vr(raw, 0x00080060, b"UI") == raw.replace(b"CS", b"UI")
    assert replaced(raw, b"AB^C", b"AB^D") == raw[:-1] + b"D"
    with pytest.raises(ValueError):
        with_vr(raw, 0x00200010, b"UI")  # not there
