"""Shared test fixtures: the real CIFAR-10 (as JPEG files) and real ImageNet weights from ../shared.

Under CI=true a missing shared file fails the suite; elsewhere the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIFAR10_SHARED", ROOT.parent / "shared"))
DATA_TARBALL = SHARED / "data" / "cifar10-jpeg.tar.gz"
LITE0_WEIGHTS = SHARED / "weights" / "efficientnet_lite0_imagenet.pth"

sys.path.insert(0, str(ROOT))


def _require(path: Path) -> Path:
    if path.is_file():
        return path
    message = f"shared test file missing: {path}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: the shared data must be there)")
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """A private decode cache per test session, and no waiting on the Hugging Face hub's retries offline."""
    os.environ["CIFAR10_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """The full CIFAR-10 as JPEG files, extracted once per test session: DIR/{train,test}/<class>/NNNN.jpg."""
    tarball = _require(DATA_TARBALL)
    target = tmp_path_factory.mktemp("cifar")
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10-jpeg"


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    return _require(LITE0_WEIGHTS)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT
            ) -> subprocess.CompletedProcess:
    """Run a command the way a user does (`python run.py ...` or `python levels/...`), from the repo root."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
