"""`python run.py predict` on the model.pt of every level, and its messages for what cannot be predicted.

Levels 1 and 2 (conftest.level2_outputs) keep no per-image predictions: predict classifies each of their test
images, saved as PNG files, and its top classes must score the level's own test accuracy. Level 4's run
(conftest.level4_outputs) keeps its test probabilities: predict must give them back, class by class. Level 3's model is checked
the same way in tests/test_teaching.py (its logits are kept).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "250"}  # COLUMNS: each table row on one line, for parsing
ROW = re.compile(r"^│\s*(\d+)\s*│\s*([a-z]+)(?: ✓)?\s*│\s*([\d.]+)%\s*│$")


def tables(text: str) -> list[dict[str, float]]:
    """Every table predict printed, in order: {class: probability in %}, its rows in rank order."""
    out = []
    for line in text.splitlines():
        match = ROW.match(line.strip())
        if match:
            rank, name, probability = int(match.group(1)), match.group(2), float(match.group(3))
            if rank == 1:
                out.append({})
            out[-1][name] = probability
    return out


def predict(*args: str) -> tuple[int, str]:
    result = run_cli("run.py", "predict", *args, env=ENV, timeout=300)
    return result.returncode, result.stdout + result.stderr


def save_test_images(cifar_dir: Path, folder: Path, size: int) -> tuple[list[Path], list[int]]:
    """A run's test images (the stratified subset of `size`, in the run's order) as PNG files, and their labels."""
    from PIL import Image

    from common.data import load_splits

    test = load_splits(cifar_dir, train_size=200, val_size=100, test_size=size).test
    folder.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(test.images):
        paths.append(folder / f"test{i:03d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])  # lossless: the same pixels come back
    return paths, test.labels.tolist()


@pytest.mark.parametrize("level", [1, 2])
def test_predict_with_levels_1_and_2_scores_their_own_test_accuracy(level2_outputs, cifar_dir, tmp_path, level):
    from common.data import CLASSES

    m = json.loads((level2_outputs / f"level{level}" / "metrics.json").read_text())
    paths, labels = save_test_images(cifar_dir, tmp_path, m["test_size"])
    code, text = predict(*map(str, paths), "--level", str(level), "--out-dir", str(level2_outputs))
    assert code == 0, text
    assert f"Level {level}: efficientnet_lite0 at 64 px ({level2_outputs / f'level{level}' / 'model.pt'})" in text
    found = tables(text)
    assert len(found) == len(paths) and all(len(t) == 3 for t in found)
    top = [CLASSES.index(next(iter(t))) for t in found]
    right = sum(t == y for t, y in zip(top, labels))
    # the level counted its test accuracy in a batch, predict one image at a time (bf16 on some CPUs): a near tie
    # may fall the other way, no more
    assert abs(right - round(m["test_accuracy"] * len(labels))) <= 1, (right, m["test_accuracy"])
    assert m["test_accuracy"] >= 0.2 and len(set(top)) > 3  # a model that learned: the check has power


def test_predict_with_level_4_gives_the_ensembles_own_test_probabilities(level4_outputs, cifar_dir, tmp_path):
    from common.data import CLASSES

    m = json.loads((level4_outputs / "level4" / "metrics.json").read_text())
    paths, labels = save_test_images(cifar_dir, tmp_path, m["test_size"])
    with np.load(level4_outputs / "level4" / "predictions.npz") as npz:
        expected = 100 * npz[f"{m['chosen']}|test"]  # weighted vote + TTA: what model.pt must reproduce
        assert np.array_equal(npz["test_labels"], labels)
    picked = list(range(0, len(paths), 10))  # ten of them
    # --device cpu: the run computed its probabilities on the CPU, and a GPU's kernels differ in the last digits
    code, text = predict(*(str(paths[i]) for i in picked), "--top", "10", "--device", "cpu", "--out-dir",
                         str(level4_outputs))  # no --level: the highest complete level
    assert code == 0, text
    assert "Level 4: ensemble of efficientnet_lite0 (" in text and "efficientnet_lite0+se (" in text
    # each member with its vote weight and its TTA views (identity and flip: 2)
    assert re.search(r"efficientnet_lite0 \(\d\.\d\d, 2 views\)", text), text
    assert re.search(r"efficientnet_lite0\+se \(\d\.\d\d, 2 views\)", text), text
    found = tables(text)
    assert len(found) == len(picked)
    for i, shown in zip(picked, found):
        assert list(shown) == sorted(shown, key=shown.get, reverse=True) and set(shown) == set(CLASSES)
        assert np.allclose([shown[c] for c in CLASSES], expected[i], atol=0.06), (i, shown, expected[i])
    # the probabilities are not all alike, so a wrong member weight or a missing view would show
    assert expected[picked].max() - expected[picked].min() > 10


# ----------------------------------------------------------------------------------------------------------
# What predict refuses: one line, exit code 2, no traceback


def refused(code: int, text: str, message: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], text


@pytest.fixture(scope="module")
def an_image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be at least 1, not 0."),
    (["--device", "tpu"], "--device must be auto, cpu or cuda, not 'tpu'."),
])
def test_predict_refuses_bad_flags(level2_outputs, an_image, args, message):
    refused(*predict(str(an_image), "--out-dir", str(level2_outputs), *args), message)


def test_predict_on_a_cuda_device_says_when_there_is_none(level2_outputs, an_image):
    code, text = predict(str(an_image), "--out-dir", str(level2_outputs), "--device", "cuda")
    if torch.cuda.is_available():
        assert code == 0 and len(tables(text)) == 1, text
    else:
        refused(code, text, "--device cuda was asked for, but PyTorch sees no CUDA GPU here.")


@pytest.mark.parametrize("index", ["10000", "-1"])
def test_predict_refuses_a_test_index_out_of_range(level2_outputs, cifar_dir, index):
    code, text = predict("--test-index", index, "--data-dir", str(cifar_dir), "--out-dir", str(level2_outputs))
    refused(code, text, f"--test-index {index}: the test set has images 0 to 9999.")


@pytest.mark.parametrize("kind", ["truncated", "empty", "foreign state dict", "foreign tensor", "other network"])
def test_predict_refuses_a_model_file_it_cannot_use(level2_outputs, lite0_weights, an_image, tmp_path, kind):
    out = tmp_path / "out"
    shutil.copytree(level2_outputs / "level1", out / "level1")
    model = out / "level1" / "model.pt"
    if kind == "truncated":
        model.write_bytes(model.read_bytes()[:5000])
        message = f"'{model}' cannot be read as a saved model"
    elif kind == "empty":
        model.write_bytes(b"")
        message = f"'{model}' cannot be read as a saved model"
    elif kind == "foreign state dict":  # ImageNet weights, a .pt of another project
        shutil.copy(lite0_weights, model)
        message = f"'{model}' is not a model file of this project (format None, expected 'cifar10-levels model v1')"
    elif kind == "foreign tensor":
        torch.save(torch.zeros(3), model)
        message = f"'{model}' is not a model file of this project (format 'Tensor'"
    else:  # this project's format, but the weights are another network's
        saved = torch.load(model, weights_only=True)
        torch.save(dict(saved, model="resnet18"), model)
        message = "The saved weights of 'resnet18' do not fit resnet18"
    refused(*predict(str(an_image), "--level", "1", "--out-dir", str(out)), message)
