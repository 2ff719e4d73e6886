"""Shared test fixtures: the real CIFAR-10 (as JPEG files) and real ImageNet weights from ../shared.

Under CI=true a missing shared file fails the suite; elsewhere the tests that need it are skipped, saying why.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
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
    # the tar program where there is one: 2 s against 8 s for Python's tarfile (60,000 small files, measured here)
    if not (shutil.which("tar") and subprocess.run(["tar", "xzf", str(tarball), "-C", str(target)]).returncode == 0):
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


def kill_when(args: list[str], ready: Callable[[str], bool], env: dict | None = None) -> str:
    """Start `python ARGS` as run_cli does and SIGKILL it (no handler runs, as for an out-of-memory kill or a
    closed laptop) as soon as `ready` is true of a line it printed; -> what it printed.

    A level prints "epoch N/M" after epoch N is saved (fit's end_epoch), so killing on that line, at once,
    lands the kill in epoch N + 1 (a fixed sleep let a fast idle CPU finish that epoch too)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if ready(line):
                proc.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError("the process ended before it was to be killed:\n" + "".join(lines))
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return "".join(lines)


def status_row(text: str, level: int) -> str:
    """A level's row of `run.py status`'s table, each cell's wrapped lines joined: "cell | cell | ..."."""
    import re

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"│ {level} ", line))
    rows = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("│") or re.match(r"│ \d ", line):
            break
        rows.append(line)
    columns = zip(*(line.strip("│").split("│") for line in rows))
    return " | ".join(" ".join(part.strip() for part in cell if part.strip()) for cell in columns)


def nth_line(prefix: str, n: int = 1) -> Callable[[str], bool]:
    """For kill_when: true at the n-th line that starts with `prefix`."""
    seen = [0]

    def ready(line: str) -> bool:
        seen[0] += line.startswith(prefix)
        return seen[0] == n

    return ready


def untimed(history: list[dict]) -> list[dict]:
    """Epoch records without their timings, which differ from run to run."""
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in history]


# ----------------------------------------------------------------------------------------------------------
# Runs that several modules read (each made once per session, through the runner as a user makes it).
# --device cpu: their numbers are compared bit for bit (resume) or with computations on the CPU; on a GPU,
# cuDNN's autotuned kernels and TF32 make two runs differ in the last bits. --profile gpu: these runs shrink the
# original recipe (on a CPU a level would otherwise choose its CPU profile; tests/test_profiles.py tests that).

SMALL = ["--quick", "--profile", "gpu", "--device", "cpu", "--model", "efficientnet_lite0", "--img-size", "64", "--train-size", "200",
         "--val-size", "100", "--test-size", "100"]
LEVEL1_FLAGS = [*SMALL, "--epochs", "20", "--lr", "1e-2"]  # the head on cached features: 20 epochs cost little
LEVEL2_FLAGS = [*SMALL, "--batch-size", "32", "--lr", "3e-3", "--ablation-epochs", "2", "--epochs", "3"]
LEVEL3_FLAGS = ["--quick", "--profile", "gpu", "--device", "cpu", "--model", "efficientnet_lite0", "--img-size", "64", "--train-size",
                "400", "--val-size", "200", "--test-size", "200", "--lr", "1e-3", "--epochs", "2"]
LEVEL4_FLAGS = ["--quick", "--profile", "gpu", "--device", "cpu", "--models", "efficientnet_lite0,efficientnet_lite0+se", "--img-size",
                "64", "--train-size", "200", "--val-size", "100", "--test-size", "100", "--batch-size", "32", "--lr",
                "3e-3", "--epochs", "2", "--no-mixup", "--no-cutmix", "--low-res-epochs", "1", "--low-res-size", "48"]


@pytest.fixture(scope="session")
def level2_outputs(cifar_dir, lite0_weights, tmp_path_factory) -> Path:
    """Level 1, then Level 2 with its ablation (2 epochs per arm, then a 3-epoch main run: the chosen arm is
    trained again), into one output folder, at 64 px on 200 / 100 / 100 images. Each level's stdout is kept
    beside its metrics.json, as stdout.txt."""
    out = tmp_path_factory.mktemp("level2")
    where = ["--weights", str(lite0_weights), "--data-dir", str(cifar_dir), "--out-dir", str(out)]
    for level, flags in [(1, LEVEL1_FLAGS), (2, LEVEL2_FLAGS)]:
        result = run_cli("run.py", "level", str(level), *flags, *where, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        (out / f"level{level}" / "stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def level3_outputs(cifar_dir, lite0_weights, tmp_path_factory) -> Path:
    """Level 2 (one epoch, no ablation: what Level 3's findings compare with), then Level 3 for 2 epochs, into
    one output folder, at 64 px (a 2 x 2 final feature map, so that Grad-CAM has positions to weigh)."""
    out = tmp_path_factory.mktemp("level3")
    where = ["--weights", str(lite0_weights), "--data-dir", str(cifar_dir), "--out-dir", str(out)]
    for level, extra in [(2, ["--no-ablation", "--epochs", "1"]), (3, [])]:
        result = run_cli("run.py", "level", str(level), *LEVEL3_FLAGS, *extra, *where, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def level4_outputs(cifar_dir, lite0_weights, tmp_path_factory) -> Path:
    """Level 4 with two pretrained members, one of them Level 3's SE network, at 64 px: predict's model and the
    straight run that the kill-and-resume test must end like. MixUp and CutMix off: in a few steps they leave
    every probability near 10%, and predict's numbers would then prove nothing."""
    out = tmp_path_factory.mktemp("level4")
    result = run_cli("run.py", "level", "4", *LEVEL4_FLAGS, *level4_where(lite0_weights, cifar_dir), "--out-dir",
                     str(out), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def level4_where(lite0_weights: Path, cifar_dir: Path) -> list[str]:
    """The --weights (one file for both lite0 members) and --data-dir of the level4_outputs run."""
    return ["--weights", f"efficientnet_lite0={lite0_weights},efficientnet_lite0+se={lite0_weights}",
            "--data-dir", str(cifar_dir)]


def paired_by_hand(out: Path, new_level: int, old_level: int) -> str:
    """How a level must word its change against an earlier level run in the same folder, computed here from both
    levels' test_predictions.npz: b images right only for the new one, c only for the old, n in all; the change
    (b - c) / n and its paired standard error sqrt((b + c) / n - ((b - c) / n)²) / sqrt(n)."""
    right = []
    for level in (new_level, old_level):
        with np.load(out / f"level{level}" / "test_predictions.npz") as saved:
            right.append(saved["logits"].argmax(1) == saved["labels"])
    b, c, n = int((right[0] & ~right[1]).sum()), int((~right[0] & right[1]).sum()), len(right[0])
    d = (b - c) / n
    se = 100 * math.sqrt(max((b + c) / n - d * d, 0) / n)
    return (f"{100 * d:+.2f} points ({'beyond' if abs(100 * d) > 2 * se else 'within'} noise; one standard error of "
            f"the difference: {se:.2f}), paired on the same test images ({b} right only here, {c} only there).")
