"""Which recipe a level trains: its CPU profile where there is no GPU (said in one line, and recorded), the original
GPU recipe on a GPU or with --profile gpu, either when asked for by name."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from run import load_level

TINY = ["--quick", "--no-pretrained", "--img-size", "32", "--train-size", "64", "--val-size", "50", "--test-size", "50"]


def test_without_a_gpu_a_level_trains_its_cpu_profile_and_says_so(cifar_dir, tmp_path):
    """A newcomer's first command, standalone script, no --profile: the CPU profile, one line saying which and how
    to ask for the other, and the record says it was chosen, not asked for."""
    level1 = load_level(1)
    result = run_cli("levels/level1_baseline.py", *TINY, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("No CUDA GPU here: training the CPU profile") and "--profile gpu" in first
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert (m["profile"], m["profile_chosen"]) == ("cpu", "chosen: no CUDA GPU here")
    assert m["config"]["model"] == level1.CPU_PROFILE["model"] != level1.Hyperparameters().model
    assert m["config"]["lr"] == level1.CPU_PROFILE["lr"]
    assert m["config"]["img_size"] == 32  # explicit flags still win over the profile


def test_profile_gpu_trains_the_original_recipe_on_a_cpu(cifar_dir, tmp_path):
    level1 = load_level(1)
    result = run_cli("run.py", "level", "1", *TINY, "--profile", "gpu", "--data-dir", str(cifar_dir),
                     "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU profile" not in result.stdout
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert (m["profile"], m["profile_chosen"]) == ("gpu", "asked for (--profile gpu)")
    assert m["config"]["model"] == level1.Hyperparameters().model == "resnet50.tv_in1k"
    assert m["config"]["lr"] == level1.Hyperparameters().lr


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_on_a_gpu_every_level_keeps_the_original_recipe(level, monkeypatch, capsys):
    """What each level's parse_args picks where PyTorch sees a CUDA GPU (mocked): no profile, the dataclass's own
    recipe, and no line about profiles; --profile cpu and --device cpu still give the CPU profile there."""
    from common.runner.cli import parse_args

    module = load_level(level)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def parse(*argv):
        return parse_args(list(argv), module.Hyperparameters(), prog="test", profiles=dict(cpu=module.CPU_PROFILE))

    settings, hp = parse()
    assert settings.profile is None and settings.profile_chosen is None and hp == module.Hyperparameters()
    assert capsys.readouterr().out == ""
    for argv, chosen in [(["--profile", "cpu"], "asked for (--profile cpu)"), (["--device", "cpu"], "chosen: --device cpu")]:
        settings, hp = parse(*argv)
        assert (settings.profile, settings.profile_chosen) == ("cpu", chosen)
        assert all(getattr(hp, k) == v for k, v in module.CPU_PROFILE.items())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings, _ = parse()
    assert (settings.profile, settings.profile_chosen) == ("cpu", "chosen: no CUDA GPU here")
