"""A finished run is never lost by habit (docs/resume.md): --resume on it says it is complete and touches nothing,
a re-run moves it to OUT/previous/, a second run in a folder in use is refused at once, and a killed run's folder
resumes at once. Run as a user runs them: the runner as a subprocess, Level 1 on 64 images at 32 px (seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, kill_when, nth_line, run_cli, status_row, untimed

FLAGS = ["--quick", "--device", "cpu", "--no-pretrained", "--model", "efficientnet_lite0", "--no-cache-features",
         "--img-size", "32", "--train-size", "64", "--val-size", "50", "--test-size", "50", "--batch-size", "16",
         "--epochs", "2"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`, hidden ones included: its bytes and when it was last written."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained(text: str) -> bool:
    """Did the run train (a level prints a line per epoch)?"""
    return any(line.startswith("epoch ") for line in text.splitlines())


def contents(folder: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _) in snapshot(folder).items()}


@pytest.fixture(scope="module")
def lone(cifar_dir, tmp_path_factory):
    """One finished Level 1 run, alone in its folder: what every other run here is compared with."""
    out = tmp_path_factory.mktemp("lone")
    result = run_cli("run.py", "level", "1", *FLAGS, "--data-dir", str(cifar_dir), "--out-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (out / ".level1.lock").exists()  # a run that ends removes its lock file
    return out, json.loads((out / "level1" / "metrics.json").read_text())


def test_resume_on_a_finished_run_says_it_is_complete_and_touches_nothing(lone, tmp_path):
    out, m = lone
    before = snapshot(out)
    # its data folder does not exist: a run that read the data (the test set again) would stop on it
    flags = ["run.py", "level", "1", *FLAGS, "--data-dir", str(tmp_path / "no-data-here"), "--out-dir", str(out)]
    result = run_cli(*flags, "--resume", timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert f"Level 1 is already complete in {out / 'level1'}: test accuracy {m['test_accuracy']:.2%}" in text
    assert f"finished {m['finished_at']}" in text and f"Its record: {out / 'level1' / 'metrics.json'}" in text
    assert "To train Level 1 again, drop --resume" in text and "or choose another --out-dir" in text
    assert not trained(text) and "nothing saved yet" not in text and "Traceback" not in text
    assert snapshot(out) == before  # metrics.json, model.pt, summary.md: the same bytes, not even rewritten

    # other flags: not the run that --resume would continue; refused, naming the flag, and still nothing touched
    other = run_cli(*flags, "--epochs", "4", "--resume", timeout=120)
    assert other.returncode == 2 and "made with other flags (--epochs: 2 there, 4 now)" in other.stdout, other.stdout
    assert snapshot(out) == before


def test_a_rerun_keeps_the_finished_run_and_a_second_run_meanwhile_is_refused(lone, cifar_dir, tmp_path):
    """The same command again, without --resume, over a finished run: the finished run goes whole to
    OUT/previous/. While that run holds the folder (stopped as by Ctrl-Z, so the timing cannot matter), a second
    one exits 2 at once naming it and changes nothing; then the first completes as a lone run does."""
    finished, m = lone
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    kept = contents(out / "level1")
    command = ["run.py", "level", "1", *FLAGS, "--data-dir", str(cifar_dir), "--out-dir", str(out)]
    first = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in first.stdout:
            lines.append(line)
            if line.startswith("epoch 1/2"):  # printed after epoch 1 is saved: one epoch to go
                first.send_signal(signal.SIGSTOP)
                break
        else:
            raise AssertionError("the first run ended before its first epoch:\n" + "".join(lines))
        during = snapshot(out)
        second = run_cli(*command, timeout=120)
        text = second.stdout + second.stderr
        assert second.returncode == 2, text
        assert f"{out / 'level1'} is in use by another run (process {first.pid}, started " in text, text
        assert f"python {command[0]} level 1 --quick" in text and "Traceback" not in text
        assert snapshot(out) == during  # nothing of the first run touched, its lock file included
        first.send_signal(signal.SIGCONT)
        lines.append(first.stdout.read())
        assert first.wait(timeout=300) == 0, "".join(lines)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
        first.stdout.close()

    output = "".join(lines)
    moved = sorted((out / "previous").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("level1-") and contents(moved[0]) == kept
    assert f"Kept the finished run that was in {out / 'level1'}" in output and f"moved to {moved[0]}/" in output
    new = json.loads((out / "level1" / "metrics.json").read_text())
    assert new["status"] == "complete" and new["started_at"] != m["started_at"]
    assert untimed(new["history"]) == untimed(m["history"]) and new["test_accuracy"] == m["test_accuracy"]
    assert not (out / ".level1.lock").exists()
    # the summary and the status read OUT/level1, the new run: the kept one is not a current run
    status = run_cli("run.py", "status", "--out-dir", str(out), env={"COLUMNS": "250"}, timeout=60)
    assert "complete" in status_row(status.stdout, 1) and new["started_at"] in status_row(status.stdout, 1)
    assert "previous" not in (out / "summary.md").read_text()


def test_a_killed_run_holds_no_lock_and_resumes_at_once(lone, cifar_dir, tmp_path):
    """SIGKILL (no handler runs, as for a power cut): the lock dies with the process; --resume, started at once,
    takes the folder and ends like the lone run."""
    _, m = lone
    flags = ["run.py", "level", "1", *FLAGS, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)]
    kill_when(flags, nth_line("epoch 1/2"))
    killed = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert killed["status"] == "running" and (tmp_path / ".level1.lock").is_file()  # a file, no longer a lock
    resumed = run_cli(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    b = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert b["status"] == "complete" and b["history"][0] == killed["history"][0]  # epoch 1 not trained again
    assert untimed(b["history"]) == untimed(m["history"]) and b["test_accuracy"] == m["test_accuracy"]
    assert not (tmp_path / ".level1.lock").exists()


ALL_FLAGS = ["--quick", "--device", "cpu", "--no-pretrained", "--model", "efficientnet_lite0", "--img-size", "32",
             "--train-size", "64", "--val-size", "50", "--test-size", "50", "--epochs", "1"]


def test_run_all_resume_skips_every_finished_level_and_carries_on(tmp_path, monkeypatch):
    """Every level ends through the same LevelRun: `run.py all --resume` over four finished runs says each is
    complete, in turn, and touches none. The four records are what each level records for these flags (read from
    its main(), in process, stopped before it runs), marked complete, each with a model.pt."""
    from common.runner.results import LevelRun
    from run import LEVEL_FILES, load_level

    planned = {}
    monkeypatch.setattr(LevelRun, "execute", lambda run, body: planned.setdefault(run.level, run.metrics) and 0)
    for level in LEVEL_FILES:
        assert load_level(level).main([*ALL_FLAGS, "--out-dir", str(tmp_path)]) == 0
    for level, metrics in planned.items():
        (tmp_path / f"level{level}").mkdir()
        record = dict(metrics, status="complete", test_accuracy=0.5 + level / 100,
                      finished_at=f"2025-01-0{level} 10:00:00 UTC")
        (tmp_path / f"level{level}" / "metrics.json").write_text(json.dumps(record, default=str))
        (tmp_path / f"level{level}" / "model.pt").write_bytes(b"level %d's model" % level)
    before = snapshot(tmp_path)

    result = run_cli("run.py", "all", "--resume", *ALL_FLAGS, "--out-dir", str(tmp_path), timeout=180)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    said = [text.index(f"Level {n} is already complete in {tmp_path / f'level{n}'}: test accuracy {50 + n}.00%")
            for n in LEVEL_FILES]
    assert said == sorted(said) and not trained(text) and "Traceback" not in text, text
    assert snapshot(tmp_path) == before
