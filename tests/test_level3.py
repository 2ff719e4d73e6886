"""Level 3: the SE block and the SE model (unit tests), then the level end to end on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LEVEL3_FLAGS, kill_when, nth_line, paired_by_hand, run_cli, status_row, untimed
from levels.level3_advanced import SqueezeExcitation, build_se_model, count_se_blocks

# ----------------------------------------------------------------------------------------------------------
# The SE block


def test_se_block_keeps_shapes_gates_within_0_1_and_passes_gradients():
    torch.manual_seed(0)
    se = SqueezeExcitation(64, reduction=16)
    assert se.excite[0].out_features == 4  # the bottleneck: 64 / 16
    x = torch.randn(5, 64, 7, 7, requires_grad=True)
    y = se(x)
    assert y.shape == x.shape
    gates = se.gates(x)
    assert gates.shape == (5, 64) and gates.min() >= 0 and gates.max() <= 1
    # the output is the input, channel by channel, times its gate: zero stays zero, a channel's sign is kept
    assert torch.allclose(y, x * gates[:, :, None, None])
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in se.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # different images get different gates: the attention depends on the image
    assert (gates[0] - gates[1]).abs().max() > 1e-4


def test_se_block_on_fewer_channels_than_the_reduction_keeps_one_unit():
    se = SqueezeExcitation(8, reduction=16)
    assert se.excite[0].out_features == 1
    assert se(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_se_model_keeps_the_pretrained_backbone_and_puts_se_on_its_final_feature_map(lite0_weights):
    from common.models import create_model, normalization

    torch.manual_seed(0)
    model = build_se_model("efficientnet_lite0", pretrained=True, weights=str(lite0_weights)).eval()
    plain = create_model("efficientnet_lite0", weights=str(lite0_weights)).eval()
    assert count_se_blocks(model) == 1 and model.se.excite[0].in_features == 1280
    assert normalization(model) == normalization(plain)
    # the ImageNet weights are loaded into the backbone (the new head aside)
    ours, theirs = model.backbone.state_dict(), plain.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if not k.startswith("classifier"))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = plain.forward_features(x)
        logits = model(x)
        expected = model.backbone.forward_head(model.se(features))
    assert logits.shape == (3, 10) and torch.allclose(logits, expected, atol=1e-5)


def test_se_in_the_last_stage_fills_every_blocks_se_slot():
    model = build_se_model("resnet18", pretrained=False, weights=None, se_in_layer4=True, reduction=16)
    blocks = list(model.backbone.layer4)
    assert all(isinstance(b.se, SqueezeExcitation) for b in blocks)
    assert blocks[0].se.excite[0].in_features == 512
    assert count_se_blocks(model) == len(blocks) + 1
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # timm keyword arguments pass through (Level 4 passes drop_path_rate)
    model = build_se_model("efficientnet_lite0", pretrained=False, weights=None, num_classes=7, se_in_layer4=True,
                           drop_path_rate=0.1)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert isinstance(model.backbone.blocks[6][0].se, SqueezeExcitation)


def test_se_model_reports_bad_weights_like_every_level(tmp_path):
    from common.device import SetupError

    with pytest.raises(SetupError, match="does not exist"):
        build_se_model("efficientnet_lite0", pretrained=True, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(SetupError, match="not a CNN"):
        build_se_model("vit_tiny_patch16_224", pretrained=False, weights=None)
    assert isinstance(build_se_model("resnet18", False, None), nn.Module)


# ----------------------------------------------------------------------------------------------------------
# The level, through the runner, after Level 2 in the same output folder (conftest.level3_outputs)


def metrics(out: Path, level: int = 3) -> dict:
    return json.loads((out / f"level{level}" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def level3_run(level3_outputs):
    return metrics(level3_outputs), level3_outputs


def test_level3_trains_the_se_block_with_the_last_stage_and_head(level3_run):
    m, out = level3_run
    assert m["status"] == "complete" and m["test_evaluations"] == 1 and len(m["history"]) == 2
    assert m["se_blocks"] == 1 and m["se_trained"] is True
    assert m["se_parameters"] == 2 * 1280 * (1280 // 16) + 1280 // 16 + 1280
    assert m["trainable_parameters"] == m["last_stage_parameters"] + m["se_parameters"] + m["head_parameters"]
    assert m["trainable_parameters"] < m["total_parameters"]
    assert 0.2 < m["test_accuracy"] <= 1 and m["augmentation"]  # chance is 0.1


def test_per_class_table_and_confusion_matrix_agree_with_each_other(level3_run):
    from common.data import CLASSES

    m, out = level3_run
    counts = np.array(m["confusion_matrix"])
    assert counts.shape == (10, 10) and counts.sum() == m["test_size"]
    assert np.trace(counts) / counts.sum() == pytest.approx(m["test_accuracy"])
    rows = [line.split(",") for line in (out / m["files"]["per_class"]).read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == list(CLASSES)
    for i, (name, precision, recall, f1, support) in enumerate(rows):
        assert int(support) == counts[i].sum()
        assert float(recall) == pytest.approx(counts[i, i] / counts[i].sum(), abs=1e-4)
        assert float(precision) == pytest.approx(counts[i, i] / max(counts[:, i].sum(), 1), abs=1e-4)
        p, r = float(precision), float(recall)
        assert float(f1) == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=2e-4)  # F1: their harmonic mean
    report = (out / m["files"]["classification_report"]).read_text()
    assert all(name in report for name in CLASSES) and "macro avg" in report
    assert (out / m["figures"]["confusion_matrix"]).read_bytes()[:4] == b"\x89PNG"


def test_findings_name_the_classes_the_numbers_point_to(level3_run):
    from common.data import CLASSES

    m, out = level3_run
    counts = np.array(m["confusion_matrix"])
    rates = counts / counts.sum(axis=1, keepdims=True)
    symmetric = rates + rates.T
    np.fill_diagonal(symmetric, -1)
    i, j = np.unravel_index(symmetric.argmax(), symmetric.shape)
    top = m["findings"]["confused_pairs"][0]
    assert set(top["pair"]) == {CLASSES[i], CLASSES[j]}
    assert top["count"] == counts[i, j] + counts[j, i]
    f1 = {c["class"]: c["f1"] for c in m["per_class"]}
    # on 20 images a class, two classes can tie: the named one must have the best (worst) F1, whichever it is
    assert f1[m["findings"]["best_classes"][0]["class"]] == max(f1.values())
    assert f1[m["findings"]["worst_classes"][0]["class"]] == min(f1.values())

    summary = (out / "summary.md").read_text()
    findings = summary.split("### Findings")[1].split("###")[0]
    assert f"{top['pair'][0]}↔{top['pair'][1]}" in findings
    assert max(f1, key=f1.get) in findings and min(f1, key=f1.get) in findings
    assert "cat↔dog" in findings  # the original assessment's expectation is checked, whatever the answer
    level2 = json.loads((out / "level2" / "metrics.json").read_text())
    assert f"Against Level 2 ({100 * level2['test_accuracy']:.2f}% on {level2['test_size']} test images)" in findings
    # the change and the verdict the numbers call for, computed here from both levels' kept test predictions:
    # paired on the same images, more than two standard errors or not
    assert paired_by_hand(out, 3, 2) in findings
    assert m["findings"]["level2_comparison"]["points"] == pytest.approx(
        100 * (m["test_accuracy"] - level2["test_accuracy"]), abs=1e-4)

    rows = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| 3 | ")}
    for item in ["Custom architecture: SE block present in the trained model",
                 "Per-class precision, recall and F1 table on disk",
                 "Normalised confusion matrix with class names on disk", "Training curves (loss and accuracy) plotted"]:
        assert "✅" in rows[item], rows[item]
    assert "✅" in next(v for k, v in rows.items() if k.startswith("Findings section present"))
    assert "❌" in rows["Test accuracy ≥ 91%"] and "⏳ not run" not in summary.split("| 2 | Test accuracy")[1][:80]
    assert "## Level 2: Augmentation and fine-tuning" in summary
    assert "![confusion_matrix](level3/confusion_matrix.png)" in summary


def test_compare_pairs_two_runs_in_different_folders_as_the_level_does_in_one(level3_outputs, tmp_path):
    """`run.py compare` on Level 3 and a copy of Level 2 moved to another folder: the same paired sentence as
    Level 3's own findings (computed here from both prediction files); a folder with no run says so, exit 2."""
    import shutil

    shutil.copytree(level3_outputs / "level2", tmp_path / "elsewhere" / "level2")
    result = run_cli("run.py", "compare", str(level3_outputs / "level3"), str(tmp_path / "elsewhere" / "level2"),
                     "--save", str(tmp_path / "se-effect.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert paired_by_hand(level3_outputs, 3, 2) in result.stdout
    saved = json.loads((tmp_path / "se-effect.json").read_text())  # the kept comparison says what it compared
    level3 = json.loads((level3_outputs / "level3" / "metrics.json").read_text())
    assert saved["new"]["test_accuracy"] == level3["test_accuracy"] and saved["old"]["level"] == 2
    assert saved["comparison"]["paired"] is True and saved["text"] in result.stdout
    assert "Not a like-for-like comparison: epochs 1 there, 2 here" in result.stdout  # the fixture's Level 2: 1 epoch

    (tmp_path / "elsewhere" / "level2" / "test_predictions.npz").unlink()  # an older run: no per-image predictions
    result = run_cli("run.py", "compare", str(level3_outputs / "level3"), str(tmp_path / "elsewhere" / "level2"))
    assert result.returncode == 0 and "the two taken as independent" in result.stdout, result.stdout

    result = run_cli("run.py", "compare", str(level3_outputs / "level3"), str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and "no readable" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_sigkill_mid_epoch_then_resume_ends_like_a_straight_run(level3_outputs, cifar_dir, lite0_weights, tmp_path):
    """Killed outright in epoch 2, shown as interrupted, then --resume: epoch 1 is not trained again, and the
    history, test accuracy, test logits and saved weights are those of the run never stopped (the same flags)."""
    flags = ["run.py", "level", "3", *LEVEL3_FLAGS, "--weights", str(lite0_weights), "--data-dir", str(cifar_dir),
             "--out-dir", str(tmp_path)]
    kill_when(flags, nth_line("epoch 1/2"))
    killed = metrics(tmp_path)
    assert killed["status"] == "running" and len(killed["history"]) == 1
    status = status_row(run_cli("run.py", "status", "--out-dir", str(tmp_path), env={"COLUMNS": "250"},
                                timeout=60).stdout, 3)
    assert "interrupted after 1 of 2 epoch(s) (killed: its process is gone)" in status and "--resume" in status

    resumed = run_cli(*flags, "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final, straight = metrics(tmp_path), metrics(level3_outputs)
    assert final["status"] == "complete" and final["history"][0] == killed["history"][0]  # timings included
    assert untimed(final["history"]) == untimed(straight["history"])
    for key in ("best_epoch", "val_accuracy", "test_accuracy", "test_loss", "confusion_matrix"):
        assert final[key] == straight[key], key
    with np.load(tmp_path / "level3" / "test_predictions.npz") as b, \
            np.load(level3_outputs / "level3" / "test_predictions.npz") as a:
        assert np.array_equal(a["logits"], b["logits"])
    a, b = (torch.load(out / "level3" / "model.pt", weights_only=True)["state_dict"] for out in (level3_outputs, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert final["resumed_after_seconds"] == killed["total_seconds"] > 0
    assert not (tmp_path / "level3" / "checkpoints").exists()
