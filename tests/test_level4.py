"""Level 4 end to end on real images (its three default members, at 32 px, through the runner), and its parts:
voting, weights fitted on validation only, test-time augmentation, calibration error, augmentation on the
device, the same numbers from the same seed, --resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import LEVEL4_FLAGS, kill_when, level4_where, nth_line, run_cli, untimed

MEMBERS = ["resnet50+se", "efficientnet_b0", "vit_small_patch16_224"]  # the defaults
# A ViT at 32 px sees 2 x 2 patches: it must run. Tiny subsets keep the three full fine-tunes within a minute on CPU.
SMOKE = ["--quick", "--profile", "gpu", "--no-pretrained", "--img-size", "32", "--train-size", "64", "--val-size", "50",
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
    assert m["approach"] == "Ensemble (weighted soft voting + TTA) of " + ", ".join(f"fine-tuned {n}" for n in MEMBERS)
    for name, record in m["members"].items():
        assert record["status"] == "trained" and record["resumed_epochs"] == 0 and len(record["history"]) == 1
        assert record["parameters"] > 1_000_000 and record["images_per_second"] > 0
    # one live-progress line per member's epoch (stdout is not a terminal here), and the history tagged by member
    assert sum(line.startswith("epoch 1/1") for line in stdout.splitlines()) == 3
    saved = torch.load(out / m["model_file"], weights_only=True)  # the whole ensemble, for run.py predict
    assert saved["kind"] == "ensemble" and [s["name"] for s in saved["members"]] == MEMBERS
    assert saved["chosen"] == m["chosen"] and saved["vote_weights"] == m["ensemble_weights"][m["chosen"]]
    assert not (out / "level4" / "checkpoints").exists()  # removed once the level completed
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
        # the ensemble against its best member, paired on the same test images
        labels, gain = npz["test_labels"], m["gain_over_best_member"]
        reference = m["best_member"] + (" + TTA" if m["chosen"].endswith("TTA") else "")
        ensemble_right = npz[f"{m['chosen']}|test"].argmax(1) == labels
        member_right = npz[f"{reference}|test"].argmax(1) == labels
        assert gain["only_new"] == (ensemble_right & ~member_right).sum()
        assert gain["only_old"] == (~ensemble_right & member_right).sum()
        assert gain["points"] == pytest.approx(100 * (ensemble_right.mean() - member_right.mean()))


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
    hardware = next(line for line in report.splitlines() if line.startswith("- **Hardware**"))
    assert all(f"training {p['train']}, inference {p['inference']}" in hardware for p in m["precision"].values())
    assert "one family" not in report  # ResNet, EfficientNet and ViT: three architectures
    assert "Paired on the same images" in report
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
    from common.augment import hflip, shift, tta_views
    from common.device import select_precision
    from common.tta_prediction import predict

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
        probs, seconds = predict(model, images, tta_views(True, False), to_input, 8, cpu,
                                 select_precision(cpu, "fp32"), display, "test")  # fp32, as the reference below
    with torch.no_grad():
        plain = model(to_input(images)).softmax(1).double().numpy()
        mirrored = model(to_input(images.flip(-1))).softmax(1).double().numpy()
    assert np.allclose(probs["plain"], plain, atol=1e-6)
    assert np.allclose(probs["tta"], (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(plain, mirrored, atol=1e-3) and set(seconds) == {"identity", "flip"}


def test_expected_calibration_error_matches_a_hand_worked_example():
    from common.runner.report import expected_calibration_error

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


def test_training_augmentation_is_autoaugment_then_crop_and_flip_per_image(cifar_dir):
    from common.augment import autoaugment_cifar10, color_jitter, random_crop_flip
    from common.data import load_splits
    from levels.level4_expert import Hyperparameters, augment

    split = load_splits(cifar_dir, train_size=10, val_size=10, test_size=10).train
    same = split.images[:1].repeat(64, 1, 1, 1)  # 64 copies of one image
    torch.manual_seed(0)
    batch = augment(same, Hyperparameters())
    assert batch.shape == same.shape and batch.dtype == torch.uint8
    assert len({bytes(img.numpy()) for img in batch}) > 32  # every image its own draws, not one for the batch
    torch.manual_seed(0)
    assert torch.equal(batch, random_crop_flip(autoaugment_cifar10(same)))  # in that order, from torch's RNG
    torch.manual_seed(0)
    plain = augment(same, Hyperparameters(autoaugment=False))
    torch.manual_seed(0)
    assert torch.equal(plain, random_crop_flip(same)) and not torch.equal(plain, batch)  # --no-autoaugment
    torch.manual_seed(0)
    jittered = augment(same, Hyperparameters(autoaugment=False, color_jitter=True))  # the CPU profile's
    torch.manual_seed(0)
    assert torch.equal(jittered, color_jitter(random_crop_flip(same))) and not torch.equal(jittered, plain)


def test_flag_errors_are_messages():
    from common.members import member_names, member_weights
    from common.device import SetupError
    from common.member_training import check_recipe
    from levels.level4_expert import Hyperparameters

    with pytest.raises(SetupError, match="even batch size"):
        check_recipe(Hyperparameters(batch_size=31))
    check_recipe(Hyperparameters(batch_size=31, mixup=False, cutmix=False))
    with pytest.raises(SetupError, match="--frozen-stages -1"):
        check_recipe(Hyperparameters(frozen_stages=-1))
    with pytest.raises(SetupError, match="--low-res-epochs -1"):
        check_recipe(Hyperparameters(low_res_epochs=-1))
    with pytest.raises(SetupError, match="NAME=FILE"):
        member_weights("model.pth", MEMBERS)
    with pytest.raises(SetupError, match="not among --models"):
        member_weights("resnet18=a.pth", MEMBERS)
    with pytest.raises(SetupError, match="NAME=FILE pairs for every file"):
        member_weights("a.pth,efficientnet_b0=b0.pth", MEMBERS)
    assert member_weights("efficientnet_b0=b0.pth", MEMBERS) == {"resnet50+se": None, "efficientnet_b0": "b0.pth",
                                                                 "vit_small_patch16_224": None}
    assert member_weights("one.pth", ["efficientnet_b0"]) == {"efficientnet_b0": "one.pth"}
    with pytest.raises(SetupError, match="twice"):
        member_names("efficientnet_b0,efficientnet_b0")
    # NAME#K: the K-th copy of NAME, its network and (unless given its own) its weights, with --seed + K - 1
    from common.members import member_network, member_seed_offset

    assert member_names("cifarnet,cifarnet#2,efficientnet_b0") == ["cifarnet", "cifarnet#2", "efficientnet_b0"]
    assert [member_network(n) for n in ("cifarnet#2", "resnet50+se#3", "resnet50+se")] == ["cifarnet", "resnet50+se",
                                                                                           "resnet50+se"]
    assert [member_seed_offset(n) for n in ("cifarnet", "cifarnet#2", "resnet50+se#3")] == [0, 1, 2]
    for bad in ("cifarnet#1", "cifarnet#x", "cifarnet#"):
        with pytest.raises(SetupError, match="NAME#2"):
            member_names(f"efficientnet_b0,{bad}")
    assert member_weights("efficientnet_b0=b0.pth", ["efficientnet_b0", "efficientnet_b0#2"]) == {
        "efficientnet_b0": "b0.pth", "efficientnet_b0#2": "b0.pth"}


TINY = ["--quick", "--profile", "gpu", "--no-pretrained", "--models", "efficientnet_lite0", "--img-size", "32", "--train-size", "64",
        "--val-size", "50", "--test-size", "100", "--batch-size", "32"]


def test_the_same_seed_gives_the_same_numbers(cifar_dir, tmp_path):
    """Two runs with the same --seed: the same history, accuracy and probabilities, to the last bit (on a CPU).
    timm's Mixup draws from numpy's and Python's generators, AutoAugment and the crop from torch's: all seeded.
    A third run with another seed differs, so the check can fail."""
    runs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        result = run_cli("run.py", "level", "4", *TINY, "--seed", seed, "--data-dir", str(cifar_dir),
                         "--out-dir", str(tmp_path / name))
        assert result.returncode == 0, result.stdout + result.stderr
        m = json.loads((tmp_path / name / "level4" / "metrics.json").read_text())
        with np.load(tmp_path / name / "level4" / "predictions.npz") as npz:
            probs = {k: npz[k] for k in npz.files}
        runs.append((m["test_accuracy"], untimed(m["history"]), probs))
    (acc_a, history_a, probs_a), (acc_b, history_b, probs_b), (_, history_c, probs_c) = runs
    assert acc_a == acc_b and history_a == history_b and len(history_a) == 1
    assert probs_a.keys() == probs_b.keys() and all(np.array_equal(probs_a[k], probs_b[k]) for k in probs_a)
    assert history_c != history_a and not np.array_equal(probs_c["efficientnet_lite0|test"],
                                                         probs_a["efficientnet_lite0|test"])


def test_sigkill_in_the_second_member_then_resume_ends_like_a_straight_run(level4_outputs, cifar_dir, lite0_weights,
                                                                         tmp_path):
    """Killed outright while the second member trains, then --resume: the first member is not trained again,
    the second continues from its last finished epoch, and every number ends as in the run never stopped
    (conftest.level4_outputs, the same flags)."""
    flags = ["run.py", "level", "4", *LEVEL4_FLAGS, *level4_where(lite0_weights, cifar_dir), "--out-dir",
             str(tmp_path)]
    kill_when(flags, nth_line("epoch 1/2", 2))  # the second member saved its first epoch: killed in its second
    killed = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert killed["status"] == "running" and len(killed["members"]["efficientnet_lite0"]["history"]) == 2
    assert len(killed["members"]["efficientnet_lite0+se"]["history"]) == 1

    resumed = run_cli(*flags, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a = json.loads((level4_outputs / "level4" / "metrics.json").read_text())
    b = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert b["members"]["efficientnet_lite0"]["resumed_epochs"] == 2  # finished: not trained again
    assert b["members"]["efficientnet_lite0+se"]["resumed_epochs"] == 1
    assert b["members"]["efficientnet_lite0+se"]["train_img_sizes"] == [48, 64]  # progressive: resumed at 64
    assert "efficientnet_lite0+se 2 epoch(s) at 48, 64 px" in (tmp_path / "level4" / "report.md").read_text()
    # what the killed process saved came back as it was, timings included: an epoch trained again has its own
    second = "efficientnet_lite0+se"
    assert b["members"][second]["history"][0] == killed["members"][second]["history"][0]
    for name in ("efficientnet_lite0", "efficientnet_lite0+se"):
        assert untimed(a["members"][name]["history"]) == untimed(b["members"][name]["history"]), name
    assert untimed(a["history"]) == untimed(b["history"]) and a["test_accuracy"] == b["test_accuracy"]
    with np.load(level4_outputs / "level4" / "predictions.npz") as x, \
            np.load(tmp_path / "level4" / "predictions.npz") as y:
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def test_progressive_resizing_grows_the_images_by_epoch_and_resumes_at_the_right_size():
    """--low-res-epochs 2 --low-res-size 48 --img-size 64 --epochs 3: epochs 1-2 train at 48 px, epoch 3 at 64; a
    copy given the saved state of the batches after two epochs (what --resume loads) continues at 64. The SIGKILL
    test below runs the same through the runner (its flags train each member's first epoch at 48 px)."""
    from common.member_training import GrowingImageBatches, training_sizes
    from levels.level4_expert import Hyperparameters

    hp = Hyperparameters(epochs=3, low_res_epochs=2, low_res_size=48, img_size=64)
    assert training_sizes(hp) == [48, 48, 64]
    assert training_sizes(dataclasses.replace(hp, low_res_epochs=0)) == [64, 64, 64]
    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8)

    def batches() -> GrowingImageBatches:
        return GrowingImageBatches(images, labels, 4, shuffle=True, seed=0, sizes=training_sizes(hp),
                                   to_input=lambda b, size: torch.nn.functional.interpolate(b.float(), size=size))

    growing = batches()
    assert [next(iter(growing))[0].shape[-1] for _ in range(2)] == [48, 48]
    resumed = batches()
    resumed.load_state_dict(growing.state_dict())
    assert [x.shape[-1] for x, _ in resumed] == [64, 64] and next(iter(growing))[0].shape[-1] == 64


def test_a_pretrained_member_learns_well_above_chance(cifar_dir, lite0_weights, tmp_path):
    """ImageNet-pretrained lite0 as a member, with every regularizer of the level on (AutoAugment, MixUp/CutMix,
    label smoothing, drop path), 2 epochs on 640 images at 64 px. Measured: 36% validation, 25.5% test plain and
    30.5% with TTA (200 test images; chance is 10%, one standard error about 3 points)."""
    result = run_cli("run.py", "level", "4", "--quick", "--profile", "gpu", "--models", "efficientnet_lite0", "--weights",
                     str(lite0_weights), "--img-size", "64", "--train-size", "640", "--val-size", "100",
                     "--test-size", "200", "--batch-size", "32", "--epochs", "2", "--lr", "1e-3",
                     "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    m = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert m["members"]["efficientnet_lite0"]["best_val_accuracy"] > 0.25
    assert m["test_accuracy"] > 0.2  # the chosen ensemble (one member + TTA)


def test_frozen_stages_keep_their_pretrained_weights_and_the_rest_trains(cifar_dir, lite0_weights, tmp_path):
    """--frozen-stages 2 through the runner: in model.pt the stem and lite0's first two stages (blocks.0 and
    blocks.1, BatchNorm statistics included) are the ImageNet file's tensors exactly, the next stage and the head
    have trained away from them, and the record and report say so. A stage count lite0 lacks is one line, exit 2,
    before anything trains."""
    flags = ["run.py", "level", "4", "--quick", "--models", "efficientnet_lite0", "--weights", str(lite0_weights),
             "--img-size", "32", "--train-size", "64", "--val-size", "50", "--test-size", "100", "--batch-size",
             "32", "--data-dir", str(cifar_dir)]
    result = run_cli(*flags, "--frozen-stages", "2", "--out-dir", str(tmp_path / "frozen"))
    assert result.returncode == 0, result.stdout + result.stderr
    pretrained = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    saved = torch.load(tmp_path / "frozen" / "level4" / "model.pt", weights_only=True)["members"][0]["state_dict"]
    frozen = [k for k in saved if k.split(".")[0] in ("conv_stem", "bn1") or k.startswith(("blocks.0.", "blocks.1."))]
    trained = [k for k in saved if k.startswith("blocks.2.") and saved[k].is_floating_point()]
    assert len(frozen) > 20 and trained
    assert all(torch.equal(saved[k], pretrained[k]) for k in frozen)
    assert all(not torch.equal(saved[k], pretrained[k]) for k in trained if "weight" in k)
    assert saved["classifier.weight"].abs().sum() > 0  # started at zero (zero_head), then trained
    m = json.loads((tmp_path / "frozen" / "level4" / "metrics.json").read_text())
    member = m["members"]["efficientnet_lite0"]
    assert m["config"]["frozen_stages"] == 2 and 0 < member["trainable_parameters"] < member["parameters"]
    assert "--frozen-stages 2" in (tmp_path / "frozen" / "level4" / "report.md").read_text()

    bad = run_cli(*flags, "--frozen-stages", "5", "--out-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "Traceback" not in bad.stdout + bad.stderr
    assert "--frozen-stages 5: EfficientNet has 5 stages" in bad.stdout + bad.stderr
    assert "epoch" not in bad.stdout


def test_mixup_cutmix_soft_targets_reach_the_loss():
    """The loss sees soft targets: label-smoothed and, in mixed rows, two classes at once."""
    from common.device import select_precision
    from common.training import train_one_epoch
    from common.member_training import mixing
    from levels.level4_expert import Hyperparameters

    torch.manual_seed(0)
    np.random.seed(0)
    mix, loss_fn = mixing(Hyperparameters())
    seen = []

    def spy(logits, targets):
        seen.append(targets.detach().clone())
        return loss_fn(logits, targets)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 10
    cpu = torch.device("cpu")
    train_one_epoch(model, [(x, y)] * 4, optimizer, None, spy, cpu, select_precision(cpu, "fp32"), mix=mix)
    for targets in seen:
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
        assert (targets.max(1).values < 0.99).all()  # never a hard one-hot target
    assert any(((t > 0.1).sum(1) >= 2).any() for t in seen)  # some rows carry two classes: mixed images


def test_drop_path_is_active_in_training_and_off_in_evaluation():
    from levels.level4_expert import Hyperparameters, build_member

    def outputs(drop_path: float, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = build_member("efficientnet_lite0", False, None, Hyperparameters(drop_path=drop_path, img_size=32))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the classifier's dropout aside: only stochastic depth is random here
        model.train(train)
        x = torch.rand(4, 3, 32, 32)
        with torch.no_grad():  # the features: the new head starts at zero and would hide any difference
            return model.forward_features(x), model.forward_features(x)

    a, b = outputs(0.5, train=True)
    assert not torch.allclose(a, b)  # residual branches dropped at random, differently each pass
    a, b = outputs(0.5, train=False)
    assert torch.equal(a, b)
    a, b = outputs(0.0, train=True)
    assert torch.allclose(a, b)


def test_report_says_when_the_members_are_one_family():
    from common.runner.report import _one_family_caveat

    assert "one family (efficientnet)" in _one_family_caveat(["efficientnet_lite0+se", "efficientnet_lite1",
                                                               "efficientnet_lite2"])
    assert _one_family_caveat(["resnet50+se", "efficientnet_b0", "vit_small_patch16_224"]) == ""


def test_paired_difference_counts_only_the_images_where_the_two_differ():
    from common.stats import paired_difference

    ensemble = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)  # right on 6 of 8
    member = np.array([1, 1, 0, 0, 0, 1, 1, 1], bool)  # right on 5 of 8
    d = paired_difference(ensemble, member)
    assert (d["only_new"], d["only_old"]) == (2, 1)
    assert d["points"] == pytest.approx(12.5)
    assert d["standard_error_points"] == pytest.approx(100 * ((3 / 8 - (1 / 8) ** 2) / 8) ** 0.5)
    assert paired_difference(member, member)["standard_error_points"] == 0  # identical answers: no noise


def test_the_weighted_vote_calibrates_an_underconfident_member_before_weighing_it():
    """As cifarnet beside lite0+SE in the CPU profile's full run: one member is right more often but
    underconfident (label smoothing does that), the other is less accurate and sure of itself, their mistakes
    independent. Weights fitted on the raw probabilities favour the confident one; after each member's
    temperature is fitted on validation, the more accurate member weighs more and the vote beats both members."""
    from levels.level4_expert import compare, fit_weights, temperature_scale

    rng = np.random.default_rng(0)
    n, classes = 4000, 10
    labels = {s: rng.integers(0, classes, n) for s in ("val", "test")}

    def member(accuracy: float, confidence: float) -> dict:
        out = {}
        for split, y in labels.items():
            right = rng.random(n) < accuracy
            answer = np.where(right, y, (y + rng.integers(1, classes, n)) % classes)
            logits = rng.normal(0, 1, (n, classes))
            logits[np.arange(n), answer] += 3
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            out[split] = {"plain": (1 - confidence) / classes + confidence * p}  # mixed with uniform: underconfident
        return out

    predictions = {"shy": member(0.90, 0.35), "sure": member(0.82, 1.0)}
    result = compare(predictions, labels["val"], labels["test"], "logloss")
    t, w = result["temperatures"]["weighted vote"], result["weights"]["weighted vote"]
    assert t["shy"] < 0.8 and w["shy"] > w["sure"], (t, w)
    raw = fit_weights([predictions[m]["val"]["plain"] for m in ("shy", "sure")], labels["val"])
    assert raw[0] < w["shy"] - 0.1, (raw, w)  # without the calibration the accurate member counted for less
    rows = result["rows"]
    assert rows["weighted vote"]["test_accuracy"] > max(rows["shy"]["test_accuracy"], rows["sure"]["test_accuracy"])
    p = predictions["shy"]["test"]["plain"]
    assert (temperature_scale(p, t["shy"]).argmax(1) == p.argmax(1)).all()  # calibration never changes an answer
