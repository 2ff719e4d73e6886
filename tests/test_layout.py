"""The repository's shape, as docs/layout.md describes it: lessons a learner reads in one sitting, common/ in two
parts whose import rules import-linter holds (.importlinter), and a reading order whose line counts are true."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

LEVEL_MOST_LINES = 400
MODULE_MOST_LINES = 500


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_each_level_and_each_common_module_fits_one_sitting():
    levels = {p.name: lines(p) for p in sorted((ROOT / "levels").glob("*.py"))}
    modules = {p.relative_to(ROOT).as_posix(): lines(p) for p in sorted((ROOT / "common").glob("**/*.py"))}
    assert len(levels) == 4 and len(modules) > 10
    assert {k: n for k, n in levels.items() if n > LEVEL_MOST_LINES} == {}
    assert {k: n for k, n in modules.items() if n > MODULE_MOST_LINES} == {}


def test_import_rules_hold_core_never_imports_runner_no_level_no_circle():
    """import-linter's contracts (.importlinter), run as a developer runs them: `lint-imports` from the root."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_core_contract_lists_every_module_directly_in_common():
    """The forbidden contract names the core's modules one by one: a new module in common/ must join the list,
    or it would escape the rule."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    listed = set(config["importlinter:contract:core-never-imports-runner"]["source_modules"].split())
    on_disk = {f"common.{p.stem}" for p in (ROOT / "common").glob("*.py") if p.stem != "__init__"}
    assert listed == on_disk


def test_import_linter_catches_a_circle_and_a_core_module_importing_the_runner(tmp_path):
    """The contracts can fail: a copy of common/ with progress importing training (the old circle) and
    data importing the runner breaks both."""
    import shutil

    shutil.copytree(ROOT / "common", tmp_path / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    (tmp_path / "levels").mkdir()
    with open(tmp_path / "common" / "progress.py", "a") as f:
        f.write("\nfrom common.training import TensorBatches  # noqa\n")
    with open(tmp_path / "common" / "data.py", "a") as f:
        f.write("\nfrom common.runner.summary import LEVELS  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "1 kept, 2 broken" in result.stdout
    assert "common.data -> common.runner.summary" in result.stdout
    assert ".progress -> .training" in result.stdout or ".training -> .progress" in result.stdout


def test_reading_order_line_counts_are_the_files_own():
    """docs/layout.md's reading order gives each file's line count; each is checked against the file."""
    text = (ROOT / "docs" / "layout.md").read_text()
    counted = re.findall(r"`([\w/.]+\.py)` \((\d+) lines\)", text)
    assert len(counted) >= 8
    wrong = {path: (int(n), lines(ROOT / path)) for path, n in counted if lines(ROOT / path) != int(n)}
    assert wrong == {}, "docs/layout.md: (written, actual) line counts"
