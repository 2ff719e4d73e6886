"""Level 4's from-scratch member, cifarnet (common/cifarnet.py): it learns, resumes bit for bit after SIGKILL, and
`run.py predict` rebuilds it; its pieces (whitening, alternating flip, lookahead) do what their comments say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import kill_when, nth_line, run_cli, untimed

# A smoke recipe: 1,000 training images, 4 epochs of 10 steps, the CPU profile's widths 64,128,128 (a quarter of
# the work of airbench94's 64,256,256, the default). Far from the full recipe, enough to learn.
SMOKE = ["--quick", "--models", "cifarnet", "--train-size", "1000", "--val-size", "200", "--test-size", "500",
         "--cifarnet-epochs", "4", "--cifarnet-batch-size", "100", "--cifarnet-widths", "64,128,128"]


@pytest.fixture(scope="module")
def straight_run(cifar_dir, tmp_path_factory):
    """One uninterrupted smoke run of `--models cifarnet`, shared by the tests below."""
    out = tmp_path_factory.mktemp("cifarnet-straight")
    result = run_cli("run.py", "level", "4", *SMOKE, "--data-dir", str(cifar_dir), "--out-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "level4" / "metrics.json").read_text())


def test_cifarnet_learns_from_scratch_and_says_so(straight_run):
    out, m = straight_run
    member = m["members"]["cifarnet"]
    assert member["init"] == "random" and member["img_size"] == 32  # from scratch, at CIFAR's own size
    assert len(member["history"]) == 4
    # chance is 10%; measured on the JPEG copy: 30.8% (seed 42, the default), 36.2% (seed 1), 39.4% (seed 2)
    assert m["test_accuracy"] > 0.25, m["test_accuracy"]
    assert member["tta_views"] == ["identity", "flip", "translate -1,-1", "flip translate -1,-1", "translate +1,+1",
                                   "flip translate +1,+1"]
    saved = torch.load(out / "level4" / "model.pt", weights_only=True)
    entry = saved["members"][0]
    assert entry["kind"] == "cifarnet" and entry["img_size"] == 32 and entry["views"] == member["tta_views"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(cifar_dir, straight_run, tmp_path):
    """Killed outright during epoch 3, then --resume: the same history and test accuracy as the straight run. This
    needs every piece of state: lookahead's slow weights and step count, the schedule, the shuffle and translate
    generator, and the alternating flip's epoch count."""
    _, straight = straight_run
    flags = ["run.py", "level", "4", *SMOKE, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path)]
    kill_when(flags, nth_line("epoch 2/4"))  # printed after epoch 2 is saved: the kill lands in epoch 3
    killed = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert killed["status"] == "running" and len(killed["members"]["cifarnet"]["history"]) == 2

    resumed = run_cli(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    m = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert m["members"]["cifarnet"]["resumed_epochs"] == 2
    assert untimed(m["members"]["cifarnet"]["history"]) == untimed(straight["members"]["cifarnet"]["history"])
    assert m["test_accuracy"] == straight["test_accuracy"]


def test_predict_rebuilds_cifarnet_and_gives_the_levels_own_probabilities(cifar_dir, straight_run):
    """The saved ensemble (one cifarnet member, six views) predicts a test image as the level did."""
    from common.data import load_splits
    from common.runner.predict import load_saved_model, predict_probabilities

    out, m = straight_run
    saved = load_saved_model(out / "level4" / "model.pt")
    test = load_splits(str(cifar_dir), 1000, 200, 500).test
    probs = predict_probabilities(saved, test.images[:8]).numpy()
    level = np.load(out / "level4" / "predictions.npz")[f"{m['chosen']}|test"][:8]  # its member, calibrated
    # fp32 on a CPU without bf16 units agrees to ~1e-6; bf16 inference (AMX CPUs, GPUs) to about 1e-2
    np.testing.assert_allclose(probs, level, atol=2e-2)

    result = run_cli("run.py", "predict", "--level", "4", "--out-dir", str(out), "--test-index", "3",
                     "--data-dir", str(cifar_dir), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cifarnet" in result.stdout and "true class" in result.stdout


def test_a_second_copy_trains_with_the_next_seed_and_votes(cifar_dir, tmp_path):
    """--models cifarnet,cifarnet#2: a seed ensemble. The copy is the same network and recipe with --seed + 1, so
    it learns differently and the two disagree on some images; run.py predict rebuilds both."""
    tiny = ["--quick", "--models", "cifarnet,cifarnet#2", "--train-size", "400", "--val-size", "100", "--test-size",
            "100", "--cifarnet-epochs", "2", "--cifarnet-batch-size", "100", "--cifarnet-widths", "16,32,32"]
    result = run_cli("run.py", "level", "4", *tiny, "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    m = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    first, copy = m["members"]["cifarnet"], m["members"]["cifarnet#2"]
    assert (first["seed"], copy["seed"]) == (42, 43) and copy["init"] == "random" and copy["img_size"] == 32
    assert untimed(first["history"]) != untimed(copy["history"])
    saved = torch.load(tmp_path / "level4" / "model.pt", weights_only=True)
    assert [(e["name"], e["kind"], e["model"]) for e in saved["members"]] == [
        ("cifarnet", "cifarnet", "cifarnet"), ("cifarnet#2", "cifarnet", "cifarnet")]
    probs = np.load(tmp_path / "level4" / "predictions.npz")
    assert not np.array_equal(probs["cifarnet|test"], probs["cifarnet#2|test"])
    predicted = run_cli("run.py", "predict", "--level", "4", "--out-dir", str(tmp_path), "--test-index", "3",
                        "--data-dir", str(cifar_dir), timeout=120)
    assert predicted.returncode == 0 and "cifarnet#2" in predicted.stdout, predicted.stdout + predicted.stderr


def test_whitening_layer_decorrelates_patches(cifar_dir):
    """After init_whitening, the first layer's 12 positive filters map 2x2 patches to unit-variance, uncorrelated
    outputs: their covariance on the same images is the identity (up to the eps that keeps it finite)."""
    from common.cifarnet import CIFAR_MEAN, CIFAR_STD, CifarNet, init_whitening
    from common.data import load_splits
    from common.training import model_input

    images = model_input(load_splits(str(cifar_dir), 1000, 100, 100).train.images, 32, CIFAR_MEAN, CIFAR_STD)
    model = CifarNet((8, 8, 8))
    init_whitening(model, images, eps=1e-8)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:12])  # no bias, no GELU
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.double), atol=2e-2)
    # and the other 12 filters are the same ones negated (so the GELU after it keeps both signs)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_alternating_flip_shows_every_image_both_ways_in_two_epochs():
    from common.cifarnet import AlternatingFlipBatches

    images = torch.arange(40 * 3 * 4 * 4, dtype=torch.float32).view(40, 3, 4, 4)  # every image different
    labels = torch.arange(40)
    batches = AlternatingFlipBatches(images, labels, 8, seed=0, shift=0, transform=lambda x: x)

    def flipped_by_label():
        seen = {}
        for x, y in batches:
            for image, label in zip(x, y.tolist()):
                assert torch.equal(image, images[label]) or torch.equal(image, images[label].flip(-1))
                seen[label] = not torch.equal(image, images[label])
        return seen

    first, second, third = flipped_by_label(), flipped_by_label(), flipped_by_label()
    assert set(first) == set(range(40))  # every image once per epoch
    assert all(first[k] != second[k] for k in first)  # both ways round over two epochs
    assert first == third
    assert 10 < sum(first.values()) < 30  # the starting side is random per image, not all the same
