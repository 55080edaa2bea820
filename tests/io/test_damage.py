"""The damage helpers the reader tests rely on: seeded copies, and a check that reports what escaped untyped."""

from tests.io.damage import mutations, untyped_failures


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
