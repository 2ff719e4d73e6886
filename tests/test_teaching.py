"""What the project shows a learner: `run.py predict`, `run.py status`, and the figures that look inside the
models (Level 2's augmentation grid; Level 3's top losses, SE gates and Grad-CAM), checked against the runs'
own numbers.

One Level 3 smoke run (conftest.level3_outputs, through run.py as a user runs it, on the CPU) and one Level 2
smoke run (in this process, with spies on its augmentation function) serve every test of the module. The
commands run here use one CPU thread (OMP_NUM_THREADS=1): on a 2-core machine shared with other jobs, two
spinning threads are many times slower.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from conftest import status_row as row

ONE_THREAD = {"OMP_NUM_THREADS": "1", "COLUMNS": "250"}  # COLUMNS: rich tables on one line each, for parsing
BUDGET = ["--quick", "--model", "efficientnet_lite0", "--train-size", "400", "--val-size", "200", "--test-size", "200"]
TEST_SIZE = 200


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def level3(level3_outputs):
    """The Level 3 smoke run of conftest.level3_outputs (64 px: a 2 x 2 final feature map for Grad-CAM)."""
    out = level3_outputs
    metrics = json.loads((out / "level3" / "metrics.json").read_text())
    assert metrics["test_size"] == TEST_SIZE
    stored = np.load(out / "level3" / "test_predictions.npz")
    return dict(out=out, metrics=metrics, logits=torch.from_numpy(stored["logits"]),
                labels=torch.from_numpy(stored["labels"]))


@pytest.fixture(scope="module")
def full_test(cifar_dir):
    """The whole CIFAR-10 test set, in load_splits' order, and where the smoke runs' 200 test images sit in it."""
    from common.data import load_splits, stratified_subset

    test = load_splits(cifar_dir).test
    return test, stratified_subset(test.labels.numpy(), TEST_SIZE)


@pytest.fixture(scope="module")
def rebuilt_level3(level3):
    """Level 3's saved model, rebuilt as `run.py predict` rebuilds it, on the CPU in eval mode."""
    import run
    from common.runner.predict import load_saved_model

    return load_saved_model(level3["out"] / "level3" / "model.pt", builders={"se": run._build_se})


# ----------------------------------------------------------------------------------------------------------
# run.py predict

ROW = re.compile(r"│\s*(\d)\s*│\s*([a-z]+)(?: ✓)?\s*│\s*([\d.]+)%\s*│")


def tables(text: str) -> list[list[tuple[str, float]]]:
    """The top-3 rows of every predict table in `text`, in order: [(class, probability in %), ...] each."""
    rows = [(int(n), c, float(p)) for n, c, p in ROW.findall(text)]
    out = []
    for n, c, p in rows:
        if n == 1:
            out.append([])
        out[-1].append((c, p))
    return out


def test_predict_a_test_image_and_the_same_image_as_a_png_give_the_levels_own_test_predictions(level3, full_test,
                                                                                            cifar_dir, tmp_path):
    from PIL import Image

    from common.data import CLASSES

    test, where = full_test
    probabilities = level3["logits"].softmax(1)
    j = level3["metrics"]["top_losses"][0]["test_position"]  # the run's worst test image
    k = int(where[j])
    assert int(test.labels[k]) == int(level3["labels"][j])  # the same image, found in the full test set
    png = tmp_path / f"test{k}.png"
    Image.fromarray(test.images[k].permute(1, 2, 0).numpy()).save(png)
    big = tmp_path / f"test{k}_wide.jpg"  # any size and shape: 400 x 300, shrunk to 32 x 32
    Image.fromarray(test.images[k].permute(1, 2, 0).numpy()).resize((400, 300)).save(big)
    # --device cpu: the run's logits were computed on the CPU, and a GPU's kernels differ in the last digits
    result = run_cli("run.py", "predict", "--test-index", str(k), str(png), str(big), "--out-dir",
                     str(level3["out"]), "--data-dir", str(cifar_dir), "--device", "cpu", env=ONE_THREAD)
    text = output(result)
    assert result.returncode == 0, text
    assert "Level 3:" in text and f"test image {k}" in text and f"true class: {CLASSES[test.labels[k]]}" in text
    from_index, from_png, from_big = tables(text)
    expected = probabilities[j].topk(3)
    assert [c for c, _ in from_index] == [CLASSES[c] for c in expected.indices]
    assert np.allclose([p for _, p in from_index], 100 * expected.values.numpy(), atol=0.02)
    assert from_png == from_index  # a CIFAR image saved as a PNG is predicted exactly as the test image
    assert "400 x 300, centre square shrunk to 32 x 32" in text and len(from_big) == 3


def test_predict_rejects_bad_inputs_with_a_message_and_exit_2(level3, tmp_path):
    from PIL import Image

    out = str(level3["out"])
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    whole = tmp_path / "whole.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:60])
    # a PNG whose header says 20000 x 20000 (400 Mpx): PIL refuses it before reading any pixel
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                struct.pack(">I", zlib.crc32(kind + data)))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    result = run_cli("run.py", "predict", str(text_file), str(truncated), str(bomb), str(tmp_path / "missing.png"),
                     str(tmp_path), str(whole), "--out-dir", out, env=ONE_THREAD)
    text = output(result)
    assert result.returncode == 2, text
    assert "Traceback" not in text
    assert f"'{text_file}' is not an image PIL can read" in text
    assert f"'{truncated}' cannot be read as an image (truncated or corrupted?)" in text
    assert f"'{bomb}' is too large to open safely" in text
    assert f"'{tmp_path / 'missing.png'}' does not exist" in text
    assert f"'{tmp_path}' is a folder" in text
    assert len(tables(text)) == 1  # the good image is still predicted

    for args, message in [(["--level", "1"], "Level 1 has no saved model"),
                          ([], "give one or more image files, or --test-index"),
                          (["--out-dir", str(tmp_path / "nothing")], "No level has completed with a saved model")]:
        result = run_cli("run.py", "predict", *([str(whole)] if args else []), "--out-dir", out, *args,
                         env=ONE_THREAD)
        assert result.returncode == 2 and message in output(result) and "Traceback" not in output(result), output(result)


def test_predict_averages_an_ensembles_members_over_views_with_their_vote_weights(tmp_path):
    """Level 4's model file (kind "ensemble"), built here from two small random timm networks."""
    import timm

    from common.data import CLASSES
    from common.runner.predict import load_saved_model, predict_probabilities
    from common.runner.results import MODEL_FORMAT
    from common.training import model_input

    torch.manual_seed(0)
    nets = [timm.create_model("test_resnet", pretrained=False, num_classes=10).eval() for _ in range(2)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    members = [dict(name=name, kind="timm", model="test_resnet", img_size=size, mean=mean, std=std,
                    state_dict=net.state_dict()) for name, net, size in zip("ab", nets, (32, 48))]
    torch.save(dict(format=MODEL_FORMAT, level=4, classes=list(CLASSES), kind="ensemble", members=members,
                    vote_weights=dict(a=3.0, b=1.0), tta_views=["identity", "flip"]), tmp_path / "model.pt")
    saved = load_saved_model(tmp_path / "model.pt")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        def member(net, size):
            return sum(net(model_input(x, size, mean, std)).softmax(1) for x in (images, images.flip(3))) / 2

        expected = 0.75 * member(nets[0], 32) + 0.25 * member(nets[1], 48)
    assert torch.allclose(predict_probabilities(saved, images, precision="fp32"), expected, atol=1e-5)

    # a model trained with --tta-shifts: its six views are the ones Level 4 predicted with (common.augment)
    from common.augment import tta_views

    views = tta_views(tta=True, shifts=True)
    torch.save(dict(format=MODEL_FORMAT, level=4, classes=list(CLASSES), kind="ensemble", members=members[:1],
                    tta_views=list(views)), tmp_path / "shifts.pt")
    with torch.no_grad():
        expected = sum(nets[0](model_input(view(images), 32, mean, std)).softmax(1) for view in views.values()) / 6
    shifted = predict_probabilities(load_saved_model(tmp_path / "shifts.pt"), images, precision="fp32")
    assert torch.allclose(shifted, expected, atol=1e-5) and not torch.allclose(shifted, member(nets[0], 32), atol=1e-3)

    # calibrated members (vote_temperatures): each member's view-averaged probabilities go through Level 4's own
    # temperature_scale before the weighted vote
    from levels.level4_expert import temperature_scale

    torch.save(dict(format=MODEL_FORMAT, level=4, classes=list(CLASSES), kind="ensemble", members=members,
                    vote_weights=dict(a=3.0, b=1.0), vote_temperatures=dict(a=0.5, b=2.0),
                    tta_views=["identity", "flip"]), tmp_path / "calibrated.pt")
    with torch.no_grad():
        a, b = member(nets[0], 32).double().numpy(), member(nets[1], 48).double().numpy()
    calibrated = predict_probabilities(load_saved_model(tmp_path / "calibrated.pt"), images, precision="fp32").numpy()
    assert np.allclose(calibrated, 0.75 * temperature_scale(a, 0.5) + 0.25 * temperature_scale(b, 2.0), atol=1e-5)
    assert not np.allclose(calibrated, 0.75 * a + 0.25 * b, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Level 3's figures


def test_top_losses_are_the_highest_loss_test_images_with_their_probabilities(level3, rebuilt_level3, cifar_dir):
    from common.data import CLASSES, load_splits
    from common.runner.predict import predict_probabilities

    m, logits, labels = level3["metrics"], level3["logits"], level3["labels"]
    assert m["figures"]["top_losses"] == "level3/top_losses.png" and (level3["out"] / "level3/top_losses.png").is_file()
    assert "![top_losses](level3/top_losses.png)" in (level3["out"] / "summary.md").read_text()
    assert len(logits) == m["test_size"] == TEST_SIZE
    losses = F.cross_entropy(logits, labels, reduction="none")
    probabilities = logits.softmax(1)
    shown = m["top_losses"]
    assert len(shown) == 16
    # no test image outside the figure has a higher loss than any inside it, and they are in decreasing order
    inside = [t["test_position"] for t in shown]
    outside = [i for i in range(len(losses)) if i not in inside]
    assert losses[outside].max() <= min(t["loss"] for t in shown) + 1e-6
    assert [t["loss"] for t in shown] == sorted((t["loss"] for t in shown), reverse=True)
    for t in shown:
        i = t["test_position"]
        assert t["loss"] == pytest.approx(float(losses[i]), abs=1e-5)
        assert t["true"] == CLASSES[labels[i]] and t["predicted"] == CLASSES[probabilities[i].argmax()]
        assert t["probability"] == pytest.approx(float(probabilities[i].max()), abs=1e-6)
    # and the stored logits are the saved model's: predict on the same images gives the same probabilities
    test = load_splits(cifar_dir, test_size=TEST_SIZE).test
    again = predict_probabilities(rebuilt_level3, test.images[inside])
    assert torch.allclose(again, probabilities[inside], atol=0.01)


def test_se_gates_figure_numbers_are_the_models_gates_per_class(level3, rebuilt_level3, cifar_dir):
    from common.data import CLASSES, load_splits
    from common.training import model_input

    gates = level3["metrics"]["se_gates"]
    assert level3["metrics"]["figures"]["se_gates"] == "level3/se_gates.png"
    assert (level3["out"] / "level3/se_gates.png").stat().st_size > 0
    member = rebuilt_level3.members[0]
    model = member.model
    test = load_splits(cifar_dir, test_size=TEST_SIZE).test
    with torch.no_grad():
        g = model.se.gates(model.backbone.forward_features(model_input(test.images, member.img_size, member.mean,
                                                                       member.std))).double()
    means = torch.stack([g[test.labels == k].mean(0) for k in range(len(CLASSES))])  # classes x channels
    spread = means.max(0).values - means.min(0).values
    assert gates["num_channels"] == means.shape[1] == 1280 and len(gates["channels"]) == 32
    assert gates["images_per_class"] == [int((test.labels == k).sum()) for k in range(len(CLASSES))]
    # the channels shown are those whose class means differ most, in that order, with the model's numbers
    assert np.allclose(gates["spread"], spread[gates["channels"]].numpy(), atol=1e-4)
    assert np.allclose(gates["spread"], spread.sort(descending=True).values[:32].numpy(), atol=1e-4)
    assert np.allclose(gates["class_means"], means[:, gates["channels"]].numpy(), atol=1e-4)
    assert gates["mean_gate"] == pytest.approx(float(g.mean()), abs=1e-4)
    d = gates["most_different"]
    assert d["channel"] == gates["channels"][0] and d["high"] == pytest.approx(float(means[:, d["channel"]].max()), abs=1e-4)
    sentence = (f"channel {d['channel']} of the final feature map averages {d['high']:.2f} for {d['high_class']} "
                f"and {d['low']:.2f} for {d['low_class']}")
    assert sentence in (level3["out"] / "summary.md").read_text()


def test_gradcam_figure_shows_right_and_wrong_predictions(level3):
    m, probabilities, labels = level3["metrics"], level3["logits"].softmax(1), level3["labels"]
    assert m["figures"]["gradcam"] == "level3/gradcam.png" and (level3["out"] / "level3/gradcam.png").is_file()
    cam = m["gradcam"]
    assert cam["feature_map"] == [2, 2]  # 64 px through a stride-32 network
    assert [s["correct"] for s in cam["images"]] == sorted((s["correct"] for s in cam["images"]), reverse=True)
    assert any(s["correct"] for s in cam["images"]) and any(not s["correct"] for s in cam["images"])
    for s in cam["images"]:
        i = s["test_position"]
        assert s["correct"] == bool(probabilities[i].argmax() == labels[i])
        assert s["probability"] == pytest.approx(float(probabilities[i].max()), abs=1e-6)


def test_grad_cam_is_the_gradient_weighted_feature_map_even_through_frozen_layers():
    from common.saliency import grad_cam

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
    head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    model = nn.Sequential(features, head)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen network still gets its map
    x = torch.randn(3, 3, 8, 8)
    model.train()
    maps, logits = grad_cam(model, features, x)
    assert model.training  # left as it was found
    # by hand: A = features(x); alpha = mean of d score / d A over positions; ReLU(sum alpha * A), scaled to max 1
    a = features(x).detach().requires_grad_()
    scores = head(a)
    target = scores.argmax(1)
    (grads,) = torch.autograd.grad(scores.gather(1, target[:, None]).sum(), a)
    expected = F.relu((grads.mean((2, 3), keepdim=True) * a.detach()).sum(1))
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    assert maps.shape == (3, 4, 4) and torch.allclose(maps, expected, atol=1e-6)
    assert torch.allclose(logits, scores.detach(), atol=1e-6)
    assert grad_cam(model, features, x, size=8)[0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------------------------------------
# Level 2's augmentation figure


@pytest.fixture(scope="module")
def level2_spied(cifar_dir, lite0_weights, tmp_path_factory):
    """Level 2 run in this process, with spies on the augmentation function and on the figure's plot call."""
    import levels.level2_intermediate as level2

    out = tmp_path_factory.mktemp("level2")
    calls, plots = [], []

    def augment_spy(batch, hp):
        result = real_augment(batch, hp)
        calls.append(dict(batch=batch.clone(), hp=hp, result=result.clone()))
        return result

    def plot_spy(originals, views, *args, **kwargs):
        plots.append(dict(originals=originals.clone(), views=views.clone(), args=args))
        return real_plot(originals, views, *args, **kwargs)

    real_augment, real_plot = level2.crop_flip_jitter, level2.plot_augmentation
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(level2, "crop_flip_jitter", augment_spy)
            patch.setattr(level2, "plot_augmentation", plot_spy)
            code = level2.main([*BUDGET, "--device", "cpu", "--img-size", "32", "--no-ablation", "--brightness",
                                "0.35", "--weights", str(lite0_weights), "--data-dir", str(cifar_dir),
                                "--out-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return dict(out=out, metrics=json.loads((out / "level2" / "metrics.json").read_text()), calls=calls, plots=plots)


def test_augmentation_grid_is_drawn_by_the_runs_own_augmentation_function(level2_spied, cifar_dir):
    from common.data import CLASSES, load_splits
    from common.finetuning import augmentation_steps

    m, calls, plots = level2_spied["metrics"], level2_spied["calls"], level2_spied["plots"]
    assert m["figures"]["augmentation"] == "level2/augmentation.png"
    assert (level2_spied["out"] / "level2/augmentation.png").stat().st_size > 0
    assert "![augmentation](level2/augmentation.png)" in (level2_spied["out"] / "summary.md").read_text()
    assert len(calls) == 1 and len(plots) == 1  # the figure called the level's function once, for every view
    call, plot = calls[0], plots[0]
    assert call["hp"].brightness == 0.35 == m["config"]["brightness"]  # the run's settings, flags included
    assert all(getattr(call["hp"], k) == m["config"][k] for k in ("contrast", "saturation", "hue"))
    picks, views = m["augmentation_figure"]["train_positions"], m["augmentation_figure"]["views"]
    train = load_splits(cifar_dir, train_size=400, val_size=200, test_size=TEST_SIZE).train
    assert [int(train.labels[i]) for i in picks] == list(range(6))  # six classes, one image each
    assert torch.equal(call["batch"], train.images[picks].repeat(views, 1, 1, 1))
    assert torch.equal(plot["originals"], train.images[picks])
    # every view in the grid is what the function returned: view j of image i
    assert plot["views"].shape == (6, views, 3, 32, 32)
    assert torch.equal(plot["views"], call["result"].view(views, 6, 3, 32, 32).transpose(0, 1))
    assert not torch.equal(plot["views"][:, 0], plot["views"][:, 1])  # fresh draws per view
    class_names, steps = plot["args"][0], plot["args"][1]
    assert class_names == list(CLASSES[:6]) and steps == augmentation_steps(call["hp"])
    assert any("brightness 0.35" in s for s in steps)


# ----------------------------------------------------------------------------------------------------------
# run.py status, and `run.py all` saying where it is


def test_status_shows_each_levels_state_and_what_to_run_next(level3, tmp_path):
    out = tmp_path / "out"
    (out / "level3").mkdir(parents=True)
    shutil.copy(level3["out"] / "level3" / "metrics.json", out / "level3" / "metrics.json")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now belongs to no process
    host = socket.gethostname()
    base = dict(title="t", quick=True, history=[], config=dict(epochs=3), started_at="2026-01-02 03:04:05 UTC")
    for level, extra in [
        (1, dict(status="running", process=dict(pid=os.getpid(), host=host), command="run.py level 1")),
        (2, dict(status="failed", error="Out of memory", command="run.py level 2 --batch-size 512",
                 history=[dict(epoch=1)])),
        (4, dict(status="running", process=dict(pid=gone.pid, host=host), command="run.py level 4 --quick",
                 history=[dict(epoch=1), dict(epoch=2)], train_seconds=125.0)),
    ]:
        (out / f"level{level}").mkdir(exist_ok=True)
        (out / f"level{level}" / "metrics.json").write_text(json.dumps(dict(base, level=level, **extra)))

    result = run_cli("run.py", "status", "--out-dir", str(out), env=ONE_THREAD)
    text = output(result)
    assert result.returncode == 0, text
    assert "running after 0 of 3 epoch(s)" in row(text, 1) and f"pid {os.getpid()}" in row(text, 1)
    assert "failed after 1 of 3 epoch(s)" in row(text, 2) and "python run.py level 2 --batch-size 512" in row(text, 2)
    m3 = level3["metrics"]
    assert "complete" in row(text, 3) and f"{m3['test_accuracy']:.2%}" in row(text, 3)
    assert "not met (< 91%)" in row(text, 3) and m3["started_at"] in row(text, 3)
    assert "python run.py predict IMAGE --level 3" in row(text, 3)
    assert "interrupted after 2 of 3 epoch(s) (killed: its process is gone)" in row(text, 4)
    assert "python run.py level 4 --quick --resume" in row(text, 4) and "2m 05s" in row(text, 4)

    empty = run_cli("run.py", "status", "--out-dir", str(tmp_path / "none"), env=ONE_THREAD)
    assert empty.returncode == 0 and all("not run" in row(output(empty), n) for n in (1, 2, 3, 4))
    assert f"python run.py level 1 --out-dir {tmp_path / 'none'}" in row(output(empty), 1)
    plain = run_cli("run.py", env=ONE_THREAD)  # no command: the status of ./outputs
    assert plain.returncode == 0 and "CIFAR-10 in four levels — outputs" in output(plain), output(plain)


def test_run_all_says_which_level_is_running_and_the_time_so_far():
    result = run_cli("run.py", "all", "--help", env=ONE_THREAD)  # the flags go to Level 1, which prints its help
    assert result.returncode == 0, output(result)
    assert re.search(r"Level 1 of 4 \(levels/level1_baseline\.py\) — \d+s elapsed overall", output(result))


def test_summary_time_and_precision_lines_say_what_was_measured(tmp_path):
    """Level 4 records precision per member; a record resumed before resumed_after_seconds existed has less time
    "in all" than training, and must not be printed as the run's whole time."""
    out = tmp_path / "out"
    (out / "level4").mkdir(parents=True)
    both = dict(train="fp32", inference="bf16", reason="r")
    record = dict(level=4, title="t", status="complete", config=dict(epochs=3), history=[], train_seconds=600.0,
                  total_seconds=300.0, environment=dict(device="CPU", precision="fp32"),
                  precision=dict(a=both, b=both))
    (out / "level4" / "metrics.json").write_text(json.dumps(record))
    result = run_cli("run.py", "summary", "--out-dir", str(out), env=ONE_THREAD)
    assert result.returncode == 0, output(result)
    time_line = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("- Time:"))
    assert "10.0 min training, 5.0 min in the last process (resumed" in time_line, time_line
    assert "(training fp32, inference bf16, every member)" in time_line, time_line

    record.update(total_seconds=900.0, resumed_after_seconds=400.0, precision=dict(a=both, b=dict(both, train="bf16")))
    (out / "level4" / "metrics.json").write_text(json.dumps(record))
    assert run_cli("run.py", "summary", "--out-dir", str(out), env=ONE_THREAD).returncode == 0
    time_line = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("- Time:"))
    assert "15.0 min in all (6.7 min of it before --resume)" in time_line, time_line
    assert "a: training fp32, inference bf16; b: training bf16, inference bf16" in time_line, time_line
