"""model.json read within its bound: a caller that gives no hint of its own still gets a refusal saying what to do."""

from __future__ import annotations

import pytest

from medtriage.errors import PackageError
from medtriage.format import MAX_META_BYTES, meta_bytes


def test_an_oversized_model_json_is_refused_with_a_hint_when_the_caller_gives_none(tmp_path):
    path = tmp_path / "model.json"
    with open(path, "wb") as file:
        file.truncate(MAX_META_BYTES + 1)  # sparse: takes no disk
    with pytest.raises(PackageError, match=f"model.json is {MAX_META_BYTES + 1} bytes") as refused:
        meta_bytes(path)
    assert refused.value.where == str(path) and "export it again" in refused.value.hint


def test_a_model_json_within_the_bound_is_read_without_a_hint(tmp_path):
    (tmp_path / "model.json").write_bytes(b'{"version": 3}')
    assert meta_bytes(tmp_path / "model.json") == b'{"version": 3}'
