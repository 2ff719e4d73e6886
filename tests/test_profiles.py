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


def test_the_live_table_says_the_whole_levels_time_left_from_the_kept_record_of_the_same_recipe(
        tmp_path, monkeypatch, capsys):
    """A full CPU-profile run of the kept record's recipe: every epoch line (and the live table) says the level's
    time left, the kept run's time in all less what this run has spent. Another recipe, or a smoke run: nothing."""
    import dataclasses

    from common import progress
    from common.progress import EpochStats, TrainingDisplay
    from common.runner.cli import parse_args
    from common.runner.results import LevelRun

    level1 = load_level(1)
    monkeypatch.setattr(progress, "level_time_left", lambda: None)
    (tmp_path / "cpu").mkdir()
    settings, hp = parse_args(["--profile", "cpu"], level1.Hyperparameters(), prog="test",
                              profiles=dict(cpu=level1.CPU_PROFILE))
    kept = dict(config=dataclasses.asdict(hp), total_seconds=3000.0, environment=dict(device="CPU (the kept one)"))
    (tmp_path / "cpu" / "level1.json").write_text(json.dumps(kept))

    def estimate(argv: list[str]) -> str | None:
        monkeypatch.setattr(progress, "level_time_left", lambda: None)
        settings, hp = parse_args(argv, level1.Hyperparameters(), prog="test", profiles=dict(cpu=level1.CPU_PROFILE))
        LevelRun(1, "t", "a", dataclasses.replace(settings, out_dir=str(tmp_path / "out")), hp
                 ).estimate_from_kept_record(tmp_path)
        return progress.level_time_left()

    assert estimate(["--profile", "cpu"]) == ("the level: about 50 min left, by the kept run of this recipe on "
                                              "CPU (the kept one)")
    with TrainingDisplay("t", 2, live=False) as display:
        display.end_epoch(EpochStats(1, 1.0, 0.5, 1.0, 0.5, 1e-3, 100.0, 1.0))
    assert "(the level: about 50 min left, by the kept run" in capsys.readouterr().out
    assert estimate(["--profile", "cpu", "--lr", "0.01"]) is None  # another recipe: its time is not this one's
    assert estimate(["--profile", "cpu", "--quick"]) is None
    assert estimate(["--profile", "gpu"]) is None
