"""Level 2: per-image colour jitter, partial fine-tuning, and the ablation end to end on real images."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import common.augment
from common.augment import adjust_colors, color_jitter
from common.finetuning import crop_flip_jitter, train
from conftest import LEVEL2_FLAGS, kill_when, nth_line, paired_by_hand, run_cli, untimed
from levels.level2_intermediate import ARMS, Arm, Hyperparameters, build_model

# ----------------------------------------------------------------------------------------------------------
# Augmentation


def test_adjust_colors_matches_torchvision_image_by_image():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    b, c, s = (torch.empty(6).uniform_(0.6, 1.4) for _ in range(3))
    h = torch.empty(6).uniform_(-0.3, 0.3)
    ours = adjust_colors(images, b, c, s, h)
    for i in range(6):  # torchvision, one image (and one set of factors) at a time
        x = images[i].float() / 255
        x = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b[i].item()), c[i].item()),
                                               s[i].item()), h[i].item())
        assert (ours[i].int() - (x * 255).round().int()).abs().max() <= 1, i


def test_color_jitter_draws_its_own_factors_for_every_image(monkeypatch):
    seen = {}

    def spy(images, *factors):
        seen["factors"] = factors
        return adjust_colors(images, *factors)

    monkeypatch.setattr(common.augment, "adjust_colors", spy)
    batch = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(64, 1, 1, 1)
    out = color_jitter(batch, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)
    for factor, (low, high) in zip(seen["factors"], [(0.8, 1.2)] * 3 + [(-0.1, 0.1)]):
        assert factor.shape == (64,) and len(factor.unique()) == 64  # one draw per image, not one per batch
        assert low <= factor.min() and factor.max() <= high
    assert len({img.numpy().tobytes() for img in out}) > 60  # 64 copies of one image come out different


def test_the_level2_pipeline_changes_each_copy_of_an_image_differently():
    torch.manual_seed(1)
    batch = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(128, 1, 1, 1)
    out = crop_flip_jitter(batch, Hyperparameters())
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({img.numpy().tobytes() for img in out}) == 128
    # brightness alone: each image is its own multiple of the original (up to rounding and clipping)
    bright = color_jitter(batch, brightness=0.3, contrast=0, saturation=0, hue=0).float()
    ratios = bright.mean(dim=(1, 2, 3)) / batch.float().mean()
    assert ratios.min() < 0.8 and ratios.max() > 1.2 and len(ratios.unique()) > 100


# ----------------------------------------------------------------------------------------------------------
# Partial fine-tuning


def test_frozen_layers_stay_exactly_as_pretrained_while_the_last_stage_and_head_train(cifar_dir, lite0_weights):
    from common.data import load_splits
    from common.models import last_stage
    from common.device import select_precision

    splits = load_splits(cifar_dir, train_size=128, val_size=50, test_size=10)
    images = {"train": (splits.train.images, splits.train.labels), "val": (splits.val.images, splits.val.labels)}
    hp = Hyperparameters(model="efficientnet_lite0", img_size=48, batch_size=32)
    settings = SimpleNamespace(seed=0, pretrained=True, weights=str(lite0_weights))
    cpu = torch.device("cpu")
    for arm in (Arm(augment=True, fine_tune=True), Arm(augment=False, fine_tune=False)):
        model = build_model("efficientnet_lite0", settings, arm, cpu)
        stage = {id(t) for module in last_stage(model) for t in [*module.parameters(), *module.buffers()]}
        head = {id(t) for t in model.get_classifier().parameters()}
        before = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        tensors = model.state_dict(keep_vars=True)
        train(model, images, hp, epochs=1, augmented=arm.augment, seed=0, device=cpu, precision=select_precision(cpu),
              title="test")
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        frozen = {k for k, t in tensors.items() if id(t) not in stage | head}
        assert frozen and not (changed & frozen), sorted(changed & frozen)[:5]  # weights and BatchNorm statistics
        assert {k for k, t in tensors.items() if id(t) in head} <= changed
        in_stage = {k for k, t in tensors.items() if id(t) in stage and t.dtype.is_floating_point}
        if arm.fine_tune:  # every weight of the last stage moved, and its BatchNorm statistics too
            assert in_stage <= changed, sorted(in_stage - changed)[:5]
            assert any(k.endswith("running_mean") for k in in_stage)
        else:
            assert not (changed & in_stage)


def test_the_ablation_keeps_the_recipe_unless_another_arm_is_better_beyond_noise():
    from levels.level2_intermediate import choose

    recipe = Arm(augment=True, fine_tune=True)

    def arms(accuracies):
        return [dict(name=a.name, augment=a.augment, fine_tune=a.fine_tune, val_accuracy=acc)
                for a, acc in zip(ARMS, accuracies)]

    # on 10,000 validation images one standard error of a difference near 93% is about 0.36 points
    assert choose(arms([0.90, 0.91, 0.935, 0.932]), recipe, 10_000)[0] == recipe  # +0.3: within noise
    assert choose(arms([0.90, 0.91, 0.945, 0.932]), recipe, 10_000)[0] == Arm(False, True)  # +1.3: beyond
    assert choose(arms([0.90, 0.91, 0.93, 0.94]), recipe, 10_000)[0] == recipe


# ----------------------------------------------------------------------------------------------------------
# The level, through the runner (conftest.level2_outputs: Level 1, then Level 2 with its ablation, at 32 px)


def metrics(out: Path, level: int = 2) -> dict:
    return json.loads((out / f"level{level}" / "metrics.json").read_text())


def test_the_ablation_runs_its_four_arms_on_one_budget_then_trains_the_chosen_one(level2_outputs):
    m, out = metrics(level2_outputs), level2_outputs
    assert m["status"] == "complete" and m["quick"] is True
    arms = m["ablation"]["arms"]
    assert [(a["augment"], a["fine_tune"]) for a in arms] == [(a.augment, a.fine_tune) for a in ARMS]
    assert all(len(a["history"]) == 2 and 0 < a["val_accuracy"] <= 1 for a in arms)
    head, tuned = (next(a for a in arms if not a["augment"] and a["fine_tune"] is ft) for ft in (False, True))
    assert tuned["trainable_parameters"] > 50 * head["trainable_parameters"]
    # --ablation-epochs 2 < --epochs 3: the chosen arm is trained again, for 3 epochs, as the main run
    stdout = (out / "level2" / "stdout.txt").read_text().splitlines()
    assert sum(line.startswith(("epoch 1/2", "epoch 2/2")) for line in stdout) == 8  # 4 arms x 2 epochs
    assert [line[:9] for line in stdout if line.startswith("epoch ") and "/3 " in line] == \
        ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert m["configuration"]["name"] == m["ablation"]["chosen"] and m["configuration"]["reused_ablation_arm"] is False
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3] and 1 <= m["best_epoch"] <= 3
    assert m["val_accuracy"] == max(h["val_accuracy"] for h in m["history"])
    assert m["test_evaluations"] == 1 and 0 < m["test_accuracy"] <= 1
    for key in ("curves", "ablation", "augmentation"):
        assert (out / m["figures"][key]).read_bytes()[:4] == b"\x89PNG"


def by_hand(new: float, old: float, n_new: int, n_old: int) -> str:
    """The difference of two accuracies as the analysis must word it, computed here: points, and one standard
    error of the difference, sqrt(p(1 - p) / n + q(1 - q) / m); beyond noise past two of them."""
    points = 100 * (new - old)
    se = 100 * math.sqrt(new * (1 - new) / n_new + old * (1 - old) / n_old)
    return f"{points:+.2f} points ({'beyond' if abs(points) > 2 * se else 'within'} noise; one standard error of " \
           f"the difference: {se:.2f})"


def test_the_improvement_analysis_is_written_from_the_numbers(level2_outputs):
    m, level1 = metrics(level2_outputs), metrics(level2_outputs, 1)
    arms = {(a["augment"], a["fine_tune"]): a["val_accuracy"] for a in m["ablation"]["arms"]}
    text, n = m["improvement_analysis"], m["val_size"]
    assert f"augmentation changed accuracy by {by_hand(arms[True, True], arms[False, True], n, n)} with" in text
    assert f"and by {by_hand(arms[True, False], arms[False, False], n, n)} with the head alone" in text
    assert f"changed it by {by_hand(arms[True, True], arms[True, False], n, n)} with augmentation" in text
    assert f"Both together, against the head alone without augmentation: " \
           f"{by_hand(arms[True, True], arms[False, False], n, n)}." in text
    # both levels kept every test image's logits in this folder, so the change is paired image by image
    assert f"Against Level 1 ({100 * level1['test_accuracy']:.2f}% on {level1['test_size']:,} test images): " \
           f"{paired_by_hand(level2_outputs, 2, 1)}" in text
    assert m["level1_comparison"]["points"] == pytest.approx(100 * (m["test_accuracy"] - level1["test_accuracy"]))

    summary = (level2_outputs / "summary.md").read_text()
    assert "### Ablation study (validation accuracy)" in summary and "### Improvement analysis" in summary
    assert summary.count("| no augmentation, head only |") == 1 and "![ablation](level2/ablation.png)" in summary
    rows = {line.split(" | ")[1]: line for line in summary.splitlines() if line.startswith("| 2 | ")}
    assert "✅" in rows["Ablation table: augmentation × fine-tuning, on validation"]
    assert "✅" in rows["Improvement analysis present"]
    augmentation_row = rows["Augmentation pipeline in use (flip, 4-pixel crop, colour jitter; per image)"]
    assert ("✅" if m["configuration"]["augment"] else "❌") in augmentation_row
    assert "not judged" in rows["The improvement analysis's conclusions hold up"]


def test_sigkill_in_the_ablation_and_in_the_main_run_then_resume_ends_like_a_straight_run(level2_outputs, cifar_dir,
                                                                                          lite0_weights, tmp_path):
    """Killed outright in the third arm's second epoch; resumed and killed again in the main run's second epoch;
    resumed to the end: every arm, the main run, the test accuracy and the saved weights are those of the run
    that was never stopped (conftest.level2_outputs, the same flags), and nothing saved was trained again."""
    flags = ["run.py", "level", "2", *LEVEL2_FLAGS, "--weights", str(lite0_weights), "--data-dir", str(cifar_dir),
             "--out-dir", str(tmp_path)]
    kill_when(flags, nth_line("epoch 1/2", 3))  # the third arm's first epoch is saved: killed in its second
    first = metrics(tmp_path)
    assert first["status"] == "running" and [len(a["history"]) for a in first["ablation"]["arms"]] == [2, 2, 1]
    kill_when([*flags, "--resume"], nth_line("epoch 1/3"))  # the main run's first epoch is saved
    second = metrics(tmp_path)
    assert [len(a["history"]) for a in second["ablation"]["arms"]] == [2, 2, 2, 2] and len(second["history"]) == 1
    # what the first process saved came back as it was, timings included: an epoch trained again takes its own time
    assert second["ablation"]["arms"][:2] == first["ablation"]["arms"][:2]
    assert second["ablation"]["arms"][2]["history"][0] == first["ablation"]["arms"][2]["history"][0]

    resumed = run_cli(*flags, "--resume", timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final, straight = metrics(tmp_path), metrics(level2_outputs)
    assert final["status"] == "complete" and final["history"][0] == second["history"][0]
    assert final["ablation"]["arms"] == second["ablation"]["arms"]
    assert [untimed(a["history"]) for a in final["ablation"]["arms"]] == \
        [untimed(a["history"]) for a in straight["ablation"]["arms"]]
    assert final["ablation"]["chosen"] == straight["ablation"]["chosen"]
    assert untimed(final["history"]) == untimed(straight["history"])
    for key in ("best_epoch", "val_accuracy", "test_accuracy", "test_loss"):
        assert final[key] == straight[key], key
    a, b = (torch.load(out / "level2" / "model.pt", weights_only=True)["state_dict"] for out in (level2_outputs, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the time: each killed process's, up to its last saved epoch, carried over
    assert final["resumed_after_seconds"] == second["total_seconds"] > first["total_seconds"] > 0
    assert not (tmp_path / "level2" / "checkpoints").exists()
