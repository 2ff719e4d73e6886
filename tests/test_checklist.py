"""The evaluation checklist and the status table, both ways: a record that meets an item gets ✅ (or "met"), one
that misses it gets ❌ (or "not met").

The smoke runs of the other modules sit far below every accuracy bar, so they can only show ❌. Here the records
are written by hand, each the way the level writes it (the keys the judges read), at, just above and just under
each bar, and each non-accuracy item in its met and unmet state. summary.md is rendered by the code that
`python run.py summary` and every level call; the status table comes from `python run.py` as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.runner.summary import ACCURACY_BARS, render_summary
from conftest import ROOT, run_cli, status_row

ENV = {"COLUMNS": "250"}  # rich tables on one line per row, for parsing

# Accuracies are counted images out of a test set of 10,000: at the bar, one image above, one under.
POSITIONS = {"at": 0, "above": 1, "under": -1}
EXPECTED = {"at": "✅", "above": "✅", "under": "❌"}


def accuracy(level: int, position: str, counted: str = "float32") -> float:
    """As the levels record it: Levels 1 to 3 as a float32 mean of right/wrong (common.training.evaluate), in
    which 9,000 of 10,000 is 0.89999998; Level 4 as a float64 mean (numpy), exact to the last bit."""
    right = round(ACCURACY_BARS[level] * 10_000) + POSITIONS[position]
    if counted == "float32":
        return (torch.arange(10_000) < right).float().mean().item()
    return right / 10_000


def record(level: int, **fields) -> dict:
    """A complete level run's metrics.json, full data, with what every level writes; `fields` on top."""
    base = dict(level=level, title=f"Level {level}", status="complete", quick=False, test_accuracy=0.5,
                val_accuracy=0.5, train_size=40_000, val_size=10_000, test_size=10_000, history=[dict(epoch=1)],
                train_seconds=60.0, total_seconds=70.0, best_epoch=1, test_evaluations=1, figures={},
                config=dict(model="efficientnet_lite0", epochs=1, img_size=224, pretrained=True, weights=None),
                environment=dict(device="CPU", precision="fp32"), command=f"run.py level {level}")
    return {**base, **fields}


def write(out: Path, *records: dict) -> Path:
    for m in records:
        (out / f"level{m['level']}").mkdir(parents=True, exist_ok=True)
        (out / f"level{m['level']}" / "metrics.json").write_text(json.dumps(m))
    return out


def checklist(out: Path) -> dict[tuple[int, str], tuple[str, str]]:
    """summary.md's checklist: (level, item) -> (mark, evidence), as rendered."""
    section = render_summary(out).split("## Evaluation checklist")[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[0].isdigit():
            rows[(int(cells[0]), cells[1])] = (cells[2], cells[3])
    return rows


def item(rows: dict, level: int, starts: str) -> tuple[str, str]:
    found = [v for (n, name), v in rows.items() if n == level and name.startswith(starts)]
    assert len(found) == 1, (level, starts, rows.keys())
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# Accuracy against each level's bar


@pytest.mark.parametrize("counted", ["float32", "float64"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_the_accuracy_item_is_ticked_at_and_above_the_bar_and_crossed_just_under(tmp_path, level, position, counted):
    acc = accuracy(level, position, counted)
    rows = checklist(write(tmp_path, record(level, test_accuracy=acc)))
    mark, evidence = item(rows, level, "Test accuracy ≥")
    assert mark == EXPECTED[position], (acc, mark, evidence)
    assert f"{100 * acc:.2f}%" in evidence and ("≥" if position != "under" else "<") in evidence
    # a smoke run is judged by the same number, and says that it is one
    rows = checklist(write(tmp_path, record(level, test_accuracy=acc, quick=True, test_size=1000)))
    mark, evidence = item(rows, level, "Test accuracy ≥")
    assert mark == EXPECTED[position] and "smoke run on 1000 test images" in evidence


@pytest.mark.parametrize("position", POSITIONS)
def test_status_says_met_at_and_above_the_bar_and_not_met_just_under(tmp_path, position):
    """`python run.py` alone (the status of ./outputs), as a user types it, in a folder holding four records."""
    write(tmp_path / "outputs", *(record(n, test_accuracy=accuracy(n, position)) for n in (1, 2, 3, 4)))
    result = run_cli(str(ROOT / "run.py"), cwd=tmp_path, env=ENV, timeout=60)
    text = result.stdout + result.stderr
    assert result.returncode == 0 and "CIFAR-10 in four levels — outputs" in text, text
    for level, bar in ACCURACY_BARS.items():
        acc, row = accuracy(level, position), status_row(text, level)
        assert f"{acc:.2%}" in row, row
        verdict = f"met (≥ {bar:.0%})" if position != "under" else f"not met (< {bar:.0%})"
        assert verdict in row and ("not met" in row) == (position == "under"), row


# ----------------------------------------------------------------------------------------------------------
# The other items, met and unmet

HEAD, STAGE, TOTAL = 12_810, 1_000_000, 3_400_000


@pytest.mark.parametrize("counts, mark", [
    (dict(trainable_parameters=HEAD), "✅"),  # the head alone
    (dict(trainable_parameters=TOTAL), "❌"),  # the backbone trained too
    (dict(trainable_parameters=None), "❌"),  # not recorded
])
def test_level1_frozen_backbone(tmp_path, counts, mark):
    m = record(1, head_parameters=HEAD, total_parameters=TOTAL, **counts)
    assert item(checklist(write(tmp_path, m)), 1, "Backbone frozen")[0] == mark


@pytest.mark.parametrize("pretrained, mark", [(True, "✅"), (False, "❌")])
def test_level1_pretrained_backbone(tmp_path, pretrained, mark):
    m = record(1, config=dict(record(1)["config"], pretrained=pretrained))
    assert item(checklist(write(tmp_path, m)), 1, "ImageNet-pretrained")[0] == mark


@pytest.mark.parametrize("trainable, mark", [(HEAD + STAGE, "✅"), (HEAD, "❌"), (TOTAL, "❌"), (HEAD + 5, "❌")])
def test_level2_partial_fine_tuning(tmp_path, trainable, mark):
    m = record(2, trainable_parameters=trainable, head_parameters=HEAD, last_stage_parameters=STAGE,
               total_parameters=TOTAL, configuration=dict(name="augmentation, head + last stage"))
    assert item(checklist(write(tmp_path, m)), 2, "Partial fine-tuning")[0] == mark


@pytest.mark.parametrize("steps, mark", [(["horizontal flip", "4-pixel crop"], "✅"), ([], "❌")])
def test_level2_augmentation(tmp_path, steps, mark):
    m = record(2, augmentation=steps, configuration=dict(name="x"))
    assert item(checklist(write(tmp_path, m)), 2, "Augmentation pipeline")[0] == mark


@pytest.mark.parametrize("se, mark", [(dict(se_blocks=1, se_parameters=205_936, se_trained=True), "✅"),
                                      (dict(se_blocks=0, se_parameters=0, se_trained=False), "❌"),
                                      (dict(se_blocks=1, se_parameters=205_936, se_trained=False), "❌")])
def test_level3_se_block(tmp_path, se, mark):
    assert item(checklist(write(tmp_path, record(3, **se))), 3, "Custom architecture")[0] == mark


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("evaluations, mark", [(1, "✅"), (2, "❌")])
def test_the_test_set_used_once(tmp_path, level, evaluations, mark):
    rows = checklist(write(tmp_path, record(level, test_evaluations=evaluations)))
    assert item(rows, level, "Test set used once")[0] == mark


MEMBERS = ["resnet50+se", "efficientnet_b0", "vit_small_patch16_224"]


def level4(**fields) -> dict:
    members = {n: dict(status="trained", best_epoch=1, history=[dict(epoch=1)], resumed_epochs=0) for n in MEMBERS}
    regularization = dict(mixup=True, cutmix=True, label_smoothing=0.1, drop_path=0.1, autoaugment=True)
    return record(4, members=members, model_file="level4/model.pt", chosen="weighted vote + TTA",
                  best_member="efficientnet_b0", config=dict(record(4)["config"], **regularization),
                  gain_over_best_member=dict(points=0.73, standard_error_points=0.18, only_new=202, only_old=129),
                  **fields)


@pytest.mark.parametrize("change, mark", [
    (None, "✅"),
    ("two members", "❌"),
    ("one member not trained", "❌"),
    ("no model file", "❌"),
])
def test_level4_at_least_three_members(tmp_path, change, mark):
    m = level4()
    if change == "two members":
        m["members"].pop(MEMBERS[-1])
    elif change == "one member not trained":
        m["members"][MEMBERS[0]]["status"] = "training"
    write(tmp_path, m)
    if change != "no model file":
        (tmp_path / "level4" / "model.pt").write_bytes(b"weights")
    mark_found, evidence = item(checklist(tmp_path), 4, "At least three models")
    assert mark_found == mark, evidence


def test_level4_three_members_say_when_one_is_a_seed_copy(tmp_path):
    m = level4()
    m["members"]["resnet50+se#2"] = m["members"].pop(MEMBERS[-1])  # three models, two networks
    write(tmp_path, m)
    (tmp_path / "level4" / "model.pt").write_bytes(b"weights")
    mark, evidence = item(checklist(tmp_path), 4, "At least three models")
    assert mark == "✅" and "3 model(s)" in evidence and "2 different networks" in evidence, evidence
    assert "different networks" not in item(checklist(write(tmp_path, level4())), 4, "At least three models")[1]


@pytest.mark.parametrize("off", [None, "mixup", "cutmix", "label_smoothing", "drop_path", "autoaugment"])
def test_level4_modern_regularization(tmp_path, off):
    m = level4()
    if off:
        m["config"][off] = 0.0 if off in ("label_smoothing", "drop_path") else False
    mark, evidence = item(checklist(write(tmp_path, m)), 4, "Modern regularization")
    assert mark == ("❌" if off else "✅"), evidence
    if off:
        assert evidence.startswith("off: ") and {"mixup": "MixUp", "cutmix": "CutMix", "autoaugment": "AutoAugment",
                                                 "label_smoothing": "label smoothing",
                                                 "drop_path": "stochastic depth"}[off] in evidence


@pytest.mark.parametrize("points, mark", [(0.73, "✅"), (0.5, "✅"), (0.49, "❌"), (-1.2, "❌"), (None, "❌")])
def test_level4_ensemble_gain_over_its_best_member(tmp_path, points, mark):
    m = level4()
    if points is None:
        del m["gain_over_best_member"]  # a record from before the gain was measured
    else:
        m["gain_over_best_member"]["points"] = points
    found, evidence = item(checklist(write(tmp_path, m)), 4, "Ensemble ahead of its best member")
    assert found == mark, evidence
    if points is not None:
        assert f"{points:+.2f} points" in evidence and "efficientnet_b0 + TTA" in evidence


def test_a_level_not_run_is_neither_ticked_nor_crossed(tmp_path):
    rows = checklist(write(tmp_path, record(1, test_accuracy=0.9)))
    assert item(rows, 1, "Test accuracy")[0] == "✅"
    assert all(mark == "⏳ not run" for (level, _), (mark, _) in rows.items() if level != 1)
    assert all(mark == "➖ not judged" for (level, name), (mark, _) in rows.items()
               if level == 1 and name.startswith("Results discussed"))
