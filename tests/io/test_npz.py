"""MedMNIST npz files read as untrusted input: headers are checked before anything is allocated or unpickled."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medtriage.errors import DataNotFoundError, InputError
from medtriage.io.npz import read_npz
from medtriage.serve.npz import read_npz_split
from tests.io.damage import mutations, untyped_failures

NPZ = Path(__file__).resolve().parents[2] / "data" / "samples" / "pneumoniamnist_28.npz"


def _layout(n: int = 4, side: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    return arrays


def _zip_members(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_the_shipped_npz_reads_as_numpy_reads_it():
    splits = read_npz(NPZ)
    with np.load(NPZ) as reference:
        for split, (images, labels) in splits.items():
            assert np.array_equal(images, reference[f"{split}_images"])
            assert np.array_equal(labels, reference[f"{split}_labels"].reshape(-1))
            assert labels.dtype == np.int64 and images.flags.writeable


def test_one_split_is_read_alone_and_fortran_order_is_kept(tmp_path):
    arrays = _layout()
    arrays["val_images"] = np.asfortranarray(arrays["val_images"])
    np.savez_compressed(tmp_path / "f.npz", **arrays)
    images, labels = read_npz(tmp_path / "f.npz", ("val",))["val"]
    assert np.array_equal(images, arrays["val_images"])
    assert np.array_equal(labels, arrays["val_labels"].reshape(-1))


def test_a_file_that_is_not_an_npz_is_an_input_error(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"DICM not a zip at all")
    with pytest.raises(InputError, match="not a readable npz"):
        read_npz(tmp_path / "x.npz")
    with pytest.raises(DataNotFoundError):
        read_npz(tmp_path / "missing.npz")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_damaged_member_is_refused_not_read_as_other_pixels(tmp_path, save):
    save(tmp_path / "d.npz", **_layout(n=40, side=28))
    with zipfile.ZipFile(tmp_path / "d.npz") as archive:
        info = archive.getinfo("val_images.npy")
    raw = bytearray((tmp_path / "d.npz").read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the member's data, past its local header
    raw[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "d.npz").write_bytes(raw)
    assert len(read_npz(tmp_path / "d.npz", ("train",))["train"][0]) == 40  # the other members are intact
    with pytest.raises(InputError, match="not a readable npz|not an npy array"):
        read_npz(tmp_path / "d.npz", ("val",))


def test_a_missing_array_is_named(tmp_path):
    arrays = _layout()
    del arrays["test_labels"]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(InputError, match="no 'test_labels' array"):
        read_npz(tmp_path / "m.npz")
    assert set(read_npz(tmp_path / "m.npz", ("train", "val"))) == {"train", "val"}


class _Marker:
    """Unpickling this writes a file: the test fails if the reader ever unpickles."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("unpickled",))


def test_pickled_objects_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "marker"
    arrays = _layout()
    arrays["train_labels"] = np.array([_Marker(str(marker))] * 4, dtype=object)
    path = _zip_members(tmp_path / "p.npz", {f"{k}.npy": _npy(v) for k, v in arrays.items()})
    with pytest.raises(InputError, match="Python objects"):
        read_npz(path)
    assert not marker.exists()


def test_a_header_claiming_more_than_the_member_holds_is_refused_before_allocation(tmp_path):
    header = io.BytesIO()
    claimed = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 224, 224)}  # 50 TB
    np.lib.format.write_array_header_1_0(header, claimed)
    arrays = {f"{k}.npy": _npy(v) for k, v in _layout().items()}
    arrays["train_images.npy"] = header.getvalue() + bytes(100)
    with pytest.raises(InputError, match="header claims"):
        read_npz(_zip_members(tmp_path / "big.npz", arrays))


def test_the_size_limit_is_applied(tmp_path):
    np.savez(tmp_path / "l.npz", **_layout(n=4, side=16))  # 1,024 bytes of images per split
    with pytest.raises(InputError, match="the limit is 1000"):
        read_npz(tmp_path / "l.npz", max_bytes=1000)
    assert read_npz(tmp_path / "l.npz", max_bytes=1024)["train"][0].nbytes == 1024


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train_images", np.zeros((4, 5, 5), np.float32), "not uint8"),
        ("train_images", np.zeros((4, 5), np.uint8), "not uint8"),
        ("train_labels", np.zeros((3,), np.int64), "one integer label for each of the 4"),
        ("train_labels", np.zeros((4, 14), np.uint8), "multi-label"),
        ("train_labels", np.zeros((4,), np.float32), "one integer label"),
        ("train_images", np.zeros((0, 5, 5), np.uint8), "'train_images' holds no images"),
        ("train_labels", np.zeros((0,), np.uint8), "one integer label for each of the 4"),
    ],
)
def test_arrays_outside_the_layout_are_refused(tmp_path, key, value, message):
    arrays = _layout() | {key: value}
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(InputError, match=message):
        read_npz(tmp_path / "s.npz")


def test_the_served_split_reader_scales_pixels_and_checks_the_split_name():
    pixels, labels = read_npz_split(NPZ, "val")
    assert pixels.shape == (len(labels), 1, 28, 28) and pixels.dtype == np.float32 and 0 <= pixels.min() <= pixels.max() <= 1
    with pytest.raises(InputError, match="unknown split"):
        read_npz_split(NPZ, "tst")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_a_damaged_npz_is_an_input_error_whatever_the_damage(tmp_path, save):
    save(tmp_path / "n.npz", **_layout(n=20, side=28))
    damaged = tmp_path / "damaged.npz"

    def read(data: bytes) -> None:
        damaged.write_bytes(data)
        read_npz(damaged)

    assert untyped_failures(mutations((tmp_path / "n.npz").read_bytes(), 1500), read, InputError) == []


def test_a_uint64_label_past_int64_is_refused_showing_its_value(tmp_path):
    """Before, 2**63 was read as -9223372036854775808, and the refusal downstream quoted that label."""
    arrays = _layout() | {"train_labels": np.array([0, 1, 2**63 + 5, 2**64 - 1], np.uint64)}
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(InputError) as refused:
        read_npz(tmp_path / "s.npz")
    assert refused.value.reason == "2 label(s) are larger than any class index can be, the first at index 2: 9223372036854775813"
    assert refused.value.where == f"{tmp_path / 's.npz'}#train_labels"


def test_uint64_labels_that_fit_read_as_int64(tmp_path):
    arrays = _layout() | {"train_labels": np.array([0, 1, 1, 2**63 - 1], np.uint64)}
    np.savez(tmp_path / "s.npz", **arrays)
    labels = read_npz(tmp_path / "s.npz")["train"][1]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 1, 2**63 - 1]
