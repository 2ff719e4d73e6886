"""Level 4 end to end on real images (its three default members, at 32 px, through the runner), and its parts:
voting, weights fitted on validation only, test-time augmentation, calibration error, --resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli

MEMBERS = ["resnet50+se", "efficientnet_b0", "vit_small_patch16_224"]  # the defaults
# A ViT at 32 px sees 2 x 2 patches: it must run. Tiny subsets keep the three full fine-tunes within a minute on CPU.
SMOKE = ["--quick", "--no-pretrained", "--img-size", "32", "--train-size", "64", "--val-size", "50",
         "--test-size", "100", "--batch-size", "32"]


@pytest.fixture(scope="module")
def smoke(cifar_dir, tmp_path_factory):
    """One Level 4 smoke run through the runner, as a subprocess; its metrics, output folder and stdout."""
    out = tmp_path_factory.mktemp("level4")
    result = run_cli("run.py", "level", "4", *SMOKE, "--data-dir", str(cifar_dir), "--out-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "level4" / "metrics.json").read_text()), out, result.stdout


def _member_predictions(npz) -> dict:
    """predictions.npz back into compare()'s input: member -> split -> plain/tta probabilities."""
    return {name: {split: {"plain": npz[f"{name}|{split}"], "tta": npz[f"{name} + TTA|{split}"]}
                   for split in ("val", "test")} for name in MEMBERS}


def test_smoke_run_trains_every_member_and_writes_the_contract(smoke):
    m, out, stdout = smoke
    assert m["level"] == 4 and m["status"] == "complete" and m["quick"] is True
    assert (m["train_size"], m["val_size"], m["test_size"]) == (64, 50, 100)
    assert list(m["members"]) == MEMBERS and m["config"]["img_size"] == 32
    for name, record in m["members"].items():
        assert record["status"] == "trained" and not record["resumed"] and len(record["history"]) == 1
        assert (out / record["checkpoint"]).stat().st_size > 1_000_000
        assert record["parameters"] > 1_000_000 and record["images_per_second"] > 0
    # one live-progress line per member's epoch (stdout is not a terminal here), and the history tagged by member
    assert sum(line.startswith("epoch 1/1") for line in stdout.splitlines()) == 3
    assert [h["member"] for h in m["history"]] == MEMBERS
    assert m["chosen"] == "weighted vote + TTA" and m["test_evaluations"] == 1
    rows = {r["name"]: r for r in m["comparison"]}
    assert m["test_accuracy"] == rows["weighted vote + TTA"]["test_accuracy"]
    assert m["val_accuracy"] == rows["weighted vote + TTA"]["val_accuracy"]
    assert len(rows) == 10  # 3 members + 2 ensembles, without and with TTA
    assert rows["soft vote"]["parameters"] == sum(r["parameters"] for r in m["members"].values())
    for key in ("accuracy", "reliability"):
        assert (out / m["figures"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_number_in_the_table_is_recomputed_from_the_saved_probabilities(smoke):
    """The table's accuracies come from this run's predictions: recompute them from predictions.npz."""
    m, out, _ = smoke
    with np.load(out / "level4" / "predictions.npz") as npz:
        for row in m["comparison"]:
            for split in ("val", "test"):
                probs, labels = npz[f"{row['name']}|{split}"], npz[f"{split}_labels"]
                assert row[f"{split}_accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
        assert len(npz["test_labels"]) == 100


def test_report_and_summary_show_every_member_and_ensemble(smoke):
    m, out, _ = smoke
    report = (out / "level4" / "report.md").read_text()
    for heading in ["Motivation", "Methods", "Setup", "Results", "Analysis", "Limitations", "How to reproduce"]:
        assert f"\n## {heading}\n" in report, heading
    for name in [*MEMBERS, "soft vote", "weighted vote"]:
        assert f"| {name} | no |" in report, name
        assert f"| {name} | yes |" in report or name == "weighted vote", name
    assert "| **weighted vote** (chosen) | yes |" in report
    assert f"{100 * m['test_accuracy']:.2f}%" in report and "Smoke run" in report
    assert "CPU" in report and "--resume" in report
    summary = (out / "summary.md").read_text()
    level4 = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| 4 | ")}
    assert "❌" in level4["Test accuracy ≥ 93%"] and "smoke run" in level4["Test accuracy ≥ 93%"]
    assert "✅" in level4["At least three models trained"]
    for item in ["Ensemble implemented and evaluated", "Comparative table", "Report present",
                 "Accuracy comparison chart"]:
        row = next(v for k, v in level4.items() if k.startswith(item))
        assert "✅" in row, row
    assert "| model | TTA |" in summary and "![reliability](level4/reliability.png)" in summary


def test_soft_voting_is_the_mean_of_the_members_probabilities(smoke):
    from levels.level4_expert import soft_vote, weighted_vote

    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    assert np.allclose(soft_vote([a, b]), [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
    assert np.allclose(weighted_vote([a, b], np.array([0.5, 0.5])), soft_vote([a, b]))
    assert np.allclose(weighted_vote([a, b], np.array([1.0, 0.0])), a)
    # the run's own soft vote is the mean of its members' saved probabilities
    _, out, _ = smoke
    with np.load(out / "level4" / "predictions.npz") as npz:
        for suffix in ("", " + TTA"):
            mean = np.mean([npz[f"{name}{suffix}|test"] for name in MEMBERS], axis=0)
            assert np.allclose(npz[f"soft vote{suffix}|test"], mean)


def test_ensemble_weights_are_fitted_without_reading_the_test_labels(smoke):
    from levels.level4_expert import compare

    m, out, _ = smoke
    with np.load(out / "level4" / "predictions.npz") as npz:
        predictions, val_labels, test_labels = _member_predictions(npz), npz["val_labels"], npz["test_labels"]
    honest = compare(predictions, val_labels, test_labels, "logloss")
    assert honest["weights"] == m["ensemble_weights"]  # the function the run used, on the run's predictions
    corrupted = (test_labels + 1 + np.arange(len(test_labels)) % 9) % 10  # every test label wrong
    assert (corrupted != test_labels).all()
    lied_to = compare(predictions, val_labels, corrupted, "logloss")
    assert lied_to["weights"] == honest["weights"]
    assert lied_to["rows"]["weighted vote"]["test_accuracy"] != honest["rows"]["weighted vote"]["test_accuracy"]
    # ...while the validation labels do move them: the check can fail. Steered labels are efficientnet_b0's
    # own answers, so its validation accuracy becomes 100% and its accuracy-based weight must grow. (Log-loss
    # weights need not move for a near-uniform member of a one-epoch smoke run, so they are not the probe.)
    steered = predictions["efficientnet_b0"]["val"]["plain"].argmax(1)
    before = compare(predictions, val_labels, test_labels, "accuracy")["weights"]["weighted vote"]
    moved = compare(predictions, steered, test_labels, "accuracy")["weights"]["weighted vote"]
    assert moved["efficientnet_b0"] > before["efficientnet_b0"] + 0.05
    for method in ("logloss", "accuracy"):
        w = np.array(list(compare(predictions, val_labels, test_labels, method)["weights"]["weighted vote"].values()))
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)


def test_tta_flipped_view_is_the_mirror_image_and_tta_averages_the_views(cifar_dir):
    from common.data import load_splits
    from common.progress import TrainingDisplay
    from common.training import select_precision
    from levels.level4_expert import hflip, predict, shift, tta_views

    images = load_splits(cifar_dir, train_size=10, val_size=10, test_size=20).test.images
    views = tta_views(tta=True, shifts=True)
    assert list(views)[:2] == ["identity", "flip"] and len(views) == 6
    flipped = views["flip"](images)
    for j in range(32):
        assert torch.equal(flipped[..., j], images[..., 31 - j])
    assert not torch.equal(flipped, images) and torch.equal(hflip(flipped), images)
    moved = shift(images, 2, 0)  # content 2 pixels to the right, black comes in on the left
    assert torch.equal(moved[..., 2:], images[..., :-2]) and (moved[..., :2] == 0).all()
    assert torch.equal(shift(images, 0, -2)[..., :-2, :], images[..., 2:, :])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))  # not mirror-symmetric
    to_input = lambda x: x.float() / 255  # noqa: E731
    cpu = torch.device("cpu")
    with TrainingDisplay("tta", 0, live=False) as display:
        probs, seconds = predict(model, images, tta_views(True, False), to_input, 8, cpu, select_precision(cpu),
                                 display, "test")
    with torch.no_grad():
        plain = model(to_input(images)).softmax(1).double().numpy()
        mirrored = model(to_input(images.flip(-1))).softmax(1).double().numpy()
    assert np.allclose(probs["plain"], plain, atol=1e-6)
    assert np.allclose(probs["tta"], (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(plain, mirrored, atol=1e-3) and set(seconds) == {"identity", "flip"}


def test_expected_calibration_error_matches_a_hand_worked_example():
    from levels.level4_expert import expected_calibration_error

    # five images, five bins of width 0.2: (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]
    probs = np.array([[0.95, 0.03, 0.01, 0.01],   # confidence .95, label 0: right   -> bin (.8, 1]
                      [0.85, 0.10, 0.03, 0.02],   # confidence .85, label 1: wrong   -> bin (.8, 1]
                      [0.20, 0.65, 0.10, 0.05],   # confidence .65, label 1: right   -> bin (.6, .8]
                      [0.19, 0.10, 0.62, 0.09],   # confidence .62, label 2: right   -> bin (.6, .8]
                      [0.30, 0.25, 0.25, 0.20]])  # confidence .30, label 1: wrong   -> bin (.2, .4]
    labels = np.array([0, 1, 1, 2, 1])
    # (.8, 1]: accuracy 1/2, confidence .90 -> |.5 - .9| = .4    x 2/5 = .16
    # (.6, .8]: accuracy 1, confidence .635 -> |1 - .635| = .365 x 2/5 = .146
    # (.2, .4]: accuracy 0, confidence .30 -> .3                 x 1/5 = .06
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(0.366)
    # a perfectly calibrated case: confidence .8, right 4 times out of 5
    calibrated = np.tile([0.8, 0.2], (5, 1))
    assert expected_calibration_error(calibrated, np.array([0, 0, 0, 0, 1]), bins=10) == pytest.approx(0.0)


def test_autoaugment_draws_its_policy_per_image(cifar_dir):
    from common.data import load_splits
    from levels.level4_expert import AutoAugmentImages

    split = load_splits(cifar_dir, train_size=10, val_size=10, test_size=10).train
    same = split.images[:1].repeat(64, 1, 1, 1)  # 64 copies of one image
    torch.manual_seed(0)
    batch, labels = AutoAugmentImages(same, torch.zeros(64, dtype=torch.long)).__getitems__(list(range(64)))
    assert batch.shape == same.shape and batch.dtype == torch.uint8
    distinct = {bytes(img.numpy()) for img in batch}
    assert len(distinct) > 8  # one draw for the whole batch would give one result (or two) for all 64


def test_flag_errors_are_messages():
    from common.training import SetupError
    from levels.level4_expert import Hyperparameters, check_recipe, member_names, member_weights

    with pytest.raises(SetupError, match="even batch size"):
        check_recipe(Hyperparameters(batch_size=31))
    check_recipe(Hyperparameters(batch_size=31, mixup=False, cutmix=False))
    with pytest.raises(SetupError, match="NAME=FILE"):
        member_weights("model.pth", MEMBERS)
    with pytest.raises(SetupError, match="not among --models"):
        member_weights("resnet18=a.pth", MEMBERS)
    assert member_weights("efficientnet_b0=b0.pth", MEMBERS) == {"resnet50+se": None, "efficientnet_b0": "b0.pth",
                                                                 "vit_small_patch16_224": None}
    assert member_weights("one.pth", ["efficientnet_b0"]) == {"efficientnet_b0": "one.pth"}
    with pytest.raises(SetupError, match="twice"):
        member_names("efficientnet_b0,efficientnet_b0")


def test_a_checkpoint_of_another_recipe_is_not_resumed(tmp_path):
    from levels.level4_expert import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(4, 2)
    signature = dict(member="tiny", epochs=1, label_smoothing=0.1)
    save_checkpoint(tmp_path / "tiny.pt", model, dict(member="tiny", history=[]), signature)
    stored = load_checkpoint(tmp_path / "tiny.pt", signature)
    assert torch.equal(stored["state_dict"]["weight"], model.weight) and not list(tmp_path.glob(".*partial"))
    assert load_checkpoint(tmp_path / "tiny.pt", dict(signature, label_smoothing=0.2)) is None
    (tmp_path / "junk.pt").write_bytes(b"half a checkpoint")
    assert load_checkpoint(tmp_path / "junk.pt", signature) is None
    assert load_checkpoint(tmp_path / "missing.pt", signature) is None


def test_resume_keeps_finished_members_and_trains_only_the_missing_one(smoke, cifar_dir, tmp_path):
    """A run stopped before vit_small_patch16_224 was saved: --resume loads what was saved and trains only the
    ViT. (Without resnet50+se this time, to keep the test short: a member is kept by its own recipe.)"""
    first, out, _ = smoke
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    members = copy / "level4" / "members"
    (members / "vit_small_patch16_224.pt").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in members.iterdir()}
    result = run_cli("run.py", "level", "4", *SMOKE, "--models", "efficientnet_b0,vit_small_patch16_224", "--resume",
                     "--data-dir", str(cifar_dir), "--out-dir", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resumed: efficientnet_b0 already trained" in result.stdout
    assert "Resume: no matching checkpoint for vit_small_patch16_224; training it." in result.stdout
    assert sum(line.startswith("epoch 1/1") for line in result.stdout.splitlines()) == 1  # only the ViT trained
    assert {p.name: p.stat().st_mtime_ns for p in members.iterdir() if p.name in kept} == kept
    assert (members / "vit_small_patch16_224.pt").is_file()
    m = json.loads((copy / "level4" / "metrics.json").read_text())
    assert {n: r["resumed"] for n, r in m["members"].items()} == {"efficientnet_b0": True,
                                                                   "vit_small_patch16_224": False}
    assert m["members"]["efficientnet_b0"]["history"] == first["members"]["efficientnet_b0"]["history"]
    # the resumed member predicts exactly what it predicted before: its trained weights were loaded
    with np.load(out / "level4" / "predictions.npz") as before, np.load(copy / "level4" / "predictions.npz") as after:
        assert np.allclose(before["efficientnet_b0|test"], after["efficientnet_b0|test"], atol=1e-6)
    assert m["status"] == "complete" and len(m["comparison"]) == 8  # 2 members + 2 ensembles, without and with TTA
