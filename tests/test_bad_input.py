"""Bad flags for Levels 2 to 4, through the command line as a user types them: exit code 2, one line that names
the flag, no traceback, and the output folder of an earlier run left exactly as it was.

(Level 1's flags: tests/test_level1.py; the other checks of Level 4's flags, in Python: tests/test_level4.py.
Each case here is a process that stops before training, a few seconds.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

TINY = ["--quick", "--profile", "gpu", "--no-pretrained", "--img-size", "32", "--train-size", "64", "--val-size", "50", "--test-size", "50"]

CASES = [
    # argparse's own checks (the common flags): its usage, then one "error:" line
    (2, ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (3, ["--reduction", "0"], "--reduction must be at least 1, not 0"),  # was a ZeroDivisionError traceback
    (4, ["--low-res-epochs", "-1"], "--low-res-epochs must be at least 0, not -1"),  # 0 (its default) turns it off
    # the levels' own checks, after the flags parse
    # (found after two ablation arms had trained, the earlier record overwritten: now checked first)
    (2, ["--fine-tune-scope", "everything"], "--fine-tune-scope must be one of last-stage, all, not 'everything'"),
    (3, ["--model", "vit_tiny_patch16_224"], "is not a CNN"),
    (4, ["--weighting", "median"], "--weighting must be logloss or accuracy, not 'median'"),
    (4, ["--models", "efficientnet_lite0,efficientnet_lite0"], "--models names a member twice"),
    # a typo in the last member: found before the first member trains (it was found after, the earlier
    # record already overwritten by a `failed` one)
    (4, ["--models", "efficientnet_lite0,resnet5O"], "--models 'resnet5O' is not a timm model. Closest timm names: "
                                                      "resnet50"),
    # a bare FILE beside NAME=FILE pairs: which member is it for? (was Python's ValueError from dict())
    (4, ["--models", "efficientnet_lite0,efficientnet_lite1", "--weights", "a.pth,efficientnet_lite1=b.pth"],
     "--weights 'a.pth,efficientnet_lite1=b.pth': give one FILE, or NAME=FILE pairs for every file"),
    (2, ["--weights", "a.pth,b.pth"], "--weights 'a.pth,b.pth': give one FILE"),
]
SCRIPTS = {2: "levels/level2_intermediate.py", 3: "levels/level3_advanced.py", 4: "levels/level4_expert.py"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("level, flags, message", CASES, ids=[f"level{n}-{' '.join(f)}" for n, f, _ in CASES])
def test_a_bad_flag_is_one_line_exit_2_and_overwrites_nothing(cifar_dir, tmp_path, level, flags, message):
    out = tmp_path / "out"
    earlier = out / f"level{level}"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"level": %d, "status": "complete", "test_accuracy": 0.9}' % level)
    (earlier / "model.pt").write_bytes(b"an earlier run's model")
    (out / "summary.md").write_text("# an earlier summary\n")
    before = snapshot(out)
    command = ["run.py", "level", str(level)] if level != 3 else [SCRIPTS[level]]  # both ways a user starts one
    result = run_cli(*command, *TINY, *flags, "--data-dir", str(cifar_dir), "--out-dir", str(out), timeout=180,
                     env={"COLUMNS": "250"})
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], text  # one line, and it names the flag
    assert snapshot(out) == before  # nothing written, nothing overwritten
