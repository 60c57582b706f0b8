"""The golden fixtures in ``tests/fixtures/parity`` are intact: every array and file hashes to the sha256 recorded
in its ``index.json`` (a corrupted or re-generated fixture would make the parity suite compare against garbage)."""
from __future__ import annotations

import hashlib

import numpy as np


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _file_sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_fixture_arrays_match_their_recorded_sha256(parity_dir, parity_index):
    assert parity_index["cases"], "index.json lists no cases"
    for name, case in parity_index["cases"].items():
        path = parity_dir / case["file"]
        assert path.stat().st_size == case["bytes"], f"{path}: size differs from index.json"
        recorded = case["sha256_per_array"]
        with np.load(path) as data:
            assert set(data.files) == set(recorded), f"{name}: arrays differ from index.json"
            bad = [key for key in data.files if _array_sha256(data[key]) != recorded[key]]
        assert not bad, f"{name}: arrays whose sha256 differs from index.json: {bad[:10]}"
        for image in case["images"]:
            assert (parity_dir / image).is_file(), f"{name}: image {image} is missing"


def test_loss_fixture_files_and_arrays_match_their_recorded_sha256(parity_loss_dir, parity_loss_index):
    files = parity_loss_index["files"]
    assert files, "loss index.json lists no files"
    for file, info in files.items():
        assert _file_sha256(parity_loss_dir / file) == info["sha256"], f"{file}: sha256 differs from index.json"
    for name, case in parity_loss_index["cases"].items():
        with np.load(parity_loss_dir / case["file"]) as data:
            bad = [key for key, meta in case["arrays"].items() if _array_sha256(data[key]) != meta["sha256"]]
        assert not bad, f"loss {name}: arrays whose sha256 differs from index.json: {bad[:10]}"
