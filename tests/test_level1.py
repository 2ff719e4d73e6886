"""Level 1 end to end, on real images with real ImageNet weights, run the way a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, kill_when, nth_line, run_cli, untimed

SMOKE = ["--quick", "--profile", "gpu", "--model", "efficientnet_lite0", "--img-size", "64", "--epochs", "5"]


@pytest.fixture(scope="module")
def pretrained_vs_random(cifar_dir, lite0_weights, tmp_path_factory):
    """The same Level 1 smoke run twice through the runner: real ImageNet weights, and random init."""
    out = tmp_path_factory.mktemp("level1")
    runs = {}
    for name, flags in [("pretrained", ["--weights", str(lite0_weights)]), ("random", ["--no-pretrained"])]:
        result = run_cli("run.py", "level", "1", *SMOKE, *flags, "--data-dir", str(cifar_dir.parent),
                         "--out-dir", str(out / name))
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = (json.loads((out / name / "level1" / "metrics.json").read_text()), out / name, result.stdout)
    return runs


def test_pretrained_features_beat_random_init_by_a_wide_margin(pretrained_vs_random):
    pretrained, random = pretrained_vs_random["pretrained"][0], pretrained_vs_random["random"][0]
    # measured here: about 47% against 25% on 1,000 test images (chance is 10%)
    assert pretrained["test_accuracy"] > random["test_accuracy"] + 0.12
    assert pretrained["test_accuracy"] > 0.35


def test_metrics_json_keeps_the_contract(pretrained_vs_random):
    m, out, stdout = pretrained_vs_random["pretrained"]
    for key in ["level", "status", "test_accuracy", "val_accuracy", "train_size", "val_size", "test_size", "history",
                "train_seconds", "total_seconds", "config", "environment", "quick", "figures"]:
        assert key in m, key
    assert m["level"] == 1 and m["status"] == "complete" and m["quick"] is True
    assert (m["train_size"], m["val_size"], m["test_size"]) == (2000, 500, 1000)
    assert len(m["history"]) == 5 and m["config"]["epochs"] == 5 and m["config"]["img_size"] == 64
    assert m["config"]["model"] == "efficientnet_lite0" and m["config"]["lr"] == 1e-3
    cuda = torch.cuda.is_available()  # --device auto: the GPU where there is one
    assert m["environment"]["torch"] == torch.__version__ and m["environment"]["device_type"] == ("cuda" if cuda else "cpu")
    assert m["environment"]["device"].startswith("CPU") is not cuda
    assert m["trainable_parameters"] == m["head_parameters"] == 1280 * 10 + 10
    png = out / m["figures"]["curves"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one plain line per epoch when stdout is not a terminal
    assert sum(line.startswith("epoch ") for line in stdout.splitlines()) == 5


def test_summary_marks_a_run_under_its_bar_with_a_cross(pretrained_vs_random):
    m, out, _ = pretrained_vs_random["pretrained"]
    summary = (out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| 1 | Test accuracy"))
    assert "❌" in row and f"{100 * m['test_accuracy']:.2f}%" in row and "smoke run" in row
    assert "| 2 | Test accuracy ≥ 90% | ⏳ not run |" in summary
    assert "not judged" in summary and "![curves](level1/curves.png)" in summary
    random_summary = (pretrained_vs_random["random"][1] / "summary.md").read_text()
    assert "| 1 | ImageNet-pretrained backbone | ❌ |" in random_summary


def test_summary_command_rebuilds_without_training(pretrained_vs_random):
    _, out, _ = pretrained_vs_random["pretrained"]
    before = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    result = run_cli("run.py", "summary", "--out-dir", str(out), timeout=60)
    assert result.returncode == 0 and (out / "summary.md").read_text() == before


def test_cached_features_predict_exactly_what_the_live_backbone_predicts(cifar_dir, lite0_weights):
    import contextlib

    from common.data import load_splits
    from common.models import create_model, normalization
    from common.training import model_input
    from levels.level1_baseline import extract_features

    class Quiet:
        def task(self, *a):
            return contextlib.nullcontext(lambda n=1: None)

    splits = load_splits(cifar_dir, train_size=100, val_size=100, test_size=100)
    model = create_model("efficientnet_lite0", weights=str(lite0_weights), drop_rate=0.0).eval()
    torch.nn.init.normal_(model.get_classifier().weight, std=0.05)  # a head that is not all zeros
    mean, std = normalization(model)
    to_input = lambda x: model_input(x, 64, mean, std)  # noqa: E731
    backbone = lambda x: model.forward_head(model.forward_features(to_input(x)), pre_logits=True)  # noqa: E731
    features = extract_features(splits.test.images, splits.test.labels, backbone, 32, Quiet(), "test")
    with torch.no_grad():
        live = model(to_input(splits.test.images))
        cached = model.get_classifier()(features)
    assert torch.allclose(live, cached, atol=1e-4)
    assert torch.equal(live.argmax(1), cached.argmax(1))


def test_cached_and_live_backbone_paths_train_the_same_head(cifar_dir, lite0_weights, tmp_path):
    """--no-cache-features runs the backbone every epoch (the seed's way): same batches, same result."""
    common = [*SMOKE, "--epochs", "2", "--train-size", "300", "--val-size", "200", "--test-size", "200",
              "--weights", str(lite0_weights), "--data-dir", str(cifar_dir)]
    results = {}
    for flag in ["--cache-features", "--no-cache-features"]:
        result = run_cli("levels/level1_baseline.py", *common, flag, "--out-dir", str(tmp_path / flag))
        assert result.returncode == 0, result.stdout + result.stderr
        results[flag] = json.loads((tmp_path / flag / "level1" / "metrics.json").read_text())
    cached, live = results["--cache-features"], results["--no-cache-features"]
    for a, b in zip(cached["history"], live["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["val_accuracy"] - b["val_accuracy"]) < 0.011
    assert abs(cached["test_accuracy"] - live["test_accuracy"]) < 0.011


def test_offline_without_weights_is_a_message_naming_the_flags(cifar_dir, tmp_path):
    # HF_HUB_OFFLINE=1: the hub fails at once with the error a machine without a network gets (LocalEntryNotFoundError,
    # checked), instead of after its DNS lookups time out (tens of seconds here)
    result = run_cli("run.py", "level", "1", "--quick", "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path),
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "--weights" in result.stdout and "--no-pretrained" in result.stdout
    assert not (tmp_path / "level1" / "metrics.json").exists()

    # a missing file is found before the data loads: said even when --data-dir holds no CIFAR-10
    (tmp_path / "no-data").mkdir()
    (tmp_path / "no-data" / "notes.txt").write_text("not CIFAR-10")
    for bad, expected, data in [(tmp_path / "missing.pth", "does not exist", tmp_path / "no-data"),
                                (tmp_path / "junk.pth", "could not be loaded", cifar_dir)]:
        if bad.name == "junk.pth":
            bad.write_bytes(b"not a checkpoint")
        result = run_cli("levels/level1_baseline.py", "--quick", "--data-dir", str(data), "--weights", str(bad),
                         "--out-dir", str(tmp_path))
        assert result.returncode == 2 and expected in result.stdout, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_divergence_stops_with_a_message_and_status_failed(cifar_dir, tmp_path):
    result = run_cli("levels/level1_baseline.py", "--quick", "--no-pretrained", "--model", "efficientnet_lite0",
                     "--img-size", "32", "--data-dir", str(cifar_dir), "--lr", "1e36", "--epochs", "2",
                     "--out-dir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Training failed" in result.stdout and "Traceback" not in result.stdout + result.stderr
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert m["status"] == "failed" and "loss became" in m["error"]


def test_ctrl_c_writes_what_was_measured_as_interrupted(cifar_dir, lite0_weights, tmp_path):
    cmd = [sys.executable, "levels/level1_baseline.py", "--quick", "--model", "efficientnet_lite0", "--weights",
           str(lite0_weights), "--no-cache-features", "--epochs", "50", "--train-size", "400", "--val-size", "100",
           "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)]
    # preexec_fn: a shell that starts a job in the background sets SIGINT to "ignore", the child inherits it and
    # Python then installs no Ctrl-C handler at all; the default disposition is what a user's terminal gives
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/50"):
            proc.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 130, output
    assert "Traceback" not in output and "Interrupted" in output
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert m["status"] == "interrupted" and 1 <= len(m["history"]) < 50 and m["test_accuracy"] is None
    assert not list(tmp_path.rglob("*.partial"))
    assert "interrupted" in (tmp_path / "summary.md").read_text()


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(cifar_dir, lite0_weights, tmp_path):
    """A run killed outright (SIGKILL: no handler runs) mid-epoch shows as interrupted, and --resume finishes it
    from its last saved epoch with the same history and test accuracy, to the bit, as a run never stopped."""
    flags = ["levels/level1_baseline.py", "--quick", "--device", "cpu", "--model", "efficientnet_lite0", "--weights",
             str(lite0_weights), "--no-cache-features", "--epochs", "4", "--train-size", "320", "--val-size", "100",
             "--test-size", "100", "--batch-size", "16", "--data-dir", str(cifar_dir)]
    straight = run_cli(*flags, "--out-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    kill_when([*flags, "--out-dir", str(tmp_path / "killed")], nth_line("epoch 2/4"))  # killed in epoch 3
    killed = json.loads((tmp_path / "killed" / "level1" / "metrics.json").read_text())
    assert killed["status"] == "running" and len(killed["history"]) == 2  # what the killed process left
    summary = run_cli("run.py", "summary", "--out-dir", str(tmp_path / "killed"), timeout=60)
    assert summary.returncode == 0
    row = next(line for line in (tmp_path / "killed" / "summary.md").read_text().splitlines()
               if line.startswith("| 1 |"))
    assert "interrupted after 2 of 4 epoch(s)" in row and "not run" not in row

    resumed = run_cli(*flags, "--out-dir", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = json.loads((tmp_path / "straight" / "level1" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "level1" / "metrics.json").read_text())
    assert b["status"] == "complete" and untimed(a["history"]) == untimed(b["history"])
    # epochs 1 and 2 were not trained again: their records are the killed process's, timings included
    assert b["history"][:2] == killed["history"]
    # the time: the killed process's (up to its last saved epoch) plus the resumed one's
    assert b["resumed_after_seconds"] == killed["total_seconds"] > 0 and b["total_seconds"] > killed["total_seconds"]
    assert a["test_accuracy"] == b["test_accuracy"] and a["best_epoch"] == b["best_epoch"]
    assert not (tmp_path / "killed" / "level1" / "checkpoints").exists()  # removed on success
    saved = torch.load(tmp_path / "killed" / "level1" / "model.pt", weights_only=True)
    assert saved["model"] == "efficientnet_lite0" and saved["img_size"] == 64 and len(saved["classes"]) == 10


@pytest.mark.parametrize("flags, message", [
    (["--train-size", "0"], "--train-size 0"), (["--train-size", "-5"], "--train-size -5"),
    (["--train-size", "40001"], "at most the 40,000"), (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"), (["--profile", "tpu"], "unknown --profile 'tpu'"),
    (["--device", "cpu", "--precision", "fp16"], "needs a CUDA GPU"),  # on any host: fp16 is for a GPU
    (["--model", "resnet5O"], "Closest timm names: resnet50"),
    (["--img-size", "2"], "--img-size 2 is too small"),
])
def test_bad_input_gets_a_message_exit_2_and_overwrites_nothing(cifar_dir, lite0_weights, tmp_path, flags, message):
    (tmp_path / "level1").mkdir()
    earlier = tmp_path / "level1" / "metrics.json"
    earlier.write_text('{"status": "complete"}')
    weights = [] if "--model" in flags else ["--weights", str(lite0_weights), "--model", "efficientnet_lite0"]
    result = run_cli("levels/level1_baseline.py", "--quick", *weights, *flags, "--data-dir", str(cifar_dir),
                     "--out-dir", str(tmp_path), "--no-pretrained" if "--model" in flags else "--seed", *(
                         [] if "--model" in flags else ["1"]), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output and "Traceback" not in output, output
    assert earlier.read_text() == '{"status": "complete"}'


def test_resume_refuses_a_corrupt_checkpoint_and_says_so_when_there_is_none(cifar_dir, lite0_weights, tmp_path):
    flags = ["levels/level1_baseline.py", "--quick", "--model", "efficientnet_lite0", "--weights", str(lite0_weights),
             "--epochs", "1", "--train-size", "100", "--val-size", "50", "--test-size", "50", "--img-size", "32",
             "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)]
    fresh = run_cli(*flags, "--resume")
    assert fresh.returncode == 0 and "nothing saved yet" in fresh.stdout
    checkpoints = tmp_path / "level1" / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "head.pt").write_bytes(b"\x00 half a file")
    corrupt = run_cli(*flags, "--resume")
    assert corrupt.returncode == 2 and "cannot be read" in corrupt.stdout and "Traceback" not in corrupt.stderr


def test_unwritable_out_dir_is_named(cifar_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("levels/level1_baseline.py", "--quick", "--no-pretrained", "--model", "efficientnet_lite0",
                     "--data-dir", str(cifar_dir), "--out-dir", str(blocker / "out"))
    assert result.returncode == 2 and "--out-dir" in result.stdout and str(blocker) in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_the_test_set_is_evaluated_exactly_once_after_training(cifar_dir, lite0_weights, tmp_path, monkeypatch):
    """Count the real evaluations of the test split (300 images; validation has 200), in process."""
    from common import training
    from levels import level1_baseline

    calls, real = [], training.evaluate

    def spy(model, batches, device, precision, *display):
        calls.append(len(batches.labels))
        return real(model, batches, device, precision, *display)

    monkeypatch.setattr(training, "evaluate", spy)
    monkeypatch.setattr(level1_baseline, "evaluate", spy)
    code = level1_baseline.main(["--quick", "--model", "efficientnet_lite0", "--weights", str(lite0_weights),
                                 "--epochs", "3", "--img-size", "32", "--train-size", "400", "--val-size", "200",
                                 "--test-size", "300", "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)])
    assert code == 0
    assert calls == [200, 200, 200, 300]  # validation after each epoch, then the test set once, at the end
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert m["test_evaluations"] == 1


def test_cifar10_dir_is_where_the_data_is_looked_for(cifar_dir, lite0_weights, tmp_path):
    result = run_cli("run.py", "level", "1", "--quick", "--model", "efficientnet_lite0", "--weights",
                     str(lite0_weights), "--img-size", "32", "--epochs", "1", "--train-size", "100", "--val-size", "50",
                     "--test-size", "50", "--out-dir", str(tmp_path), env={"CIFAR10_DIR": str(cifar_dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    m = json.loads((tmp_path / "level1" / "metrics.json").read_text())
    assert str(cifar_dir) in m["data_source"] and m["config"]["data_dir"] is None
