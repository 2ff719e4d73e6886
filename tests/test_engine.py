"""The shared engine: precision choice, flags, batches, frozen BatchNorm, best-epoch selection, the runner."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from common import device, training
from common.runner.cli import QUICK_PROFILE, parse_args
from common.training import TensorBatches, fit, freeze, make_optimizer, set_train_mode
from common.device import select_precision
from conftest import run_cli, untimed


@pytest.mark.parametrize("capability, name, scaler", [((7, 5), "fp16", True), ((8, 0), "bf16", False),
                                                     ((9, 0), "bf16", False)])
def test_gpu_precision_follows_compute_capability_not_is_bf16_supported(monkeypatch, capability, name, scaler):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    chosen = select_precision(torch.device("cuda"))
    assert (chosen.name, chosen.inference_name, chosen.use_grad_scaler) == (name, name, scaler)
    if capability < (8, 0):  # a T4 only emulates bf16: asking for it is refused with a message
        with pytest.raises(device.SetupError, match="no bf16 units"):
            select_precision(torch.device("cuda"), "bf16")


def test_cpu_precision_uses_bf16_only_where_it_is_faster(monkeypatch):
    cpu = torch.device("cpu")
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    plain = nn.Sequential(nn.Conv2d(8, 4, 3))
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    tuned = select_precision(cpu, "auto", depthwise)
    assert (tuned.name, tuned.inference_name) == ("fp32", "bf16") and "depthwise" in tuned.reason
    tuned = select_precision(cpu, "auto", plain)
    assert (tuned.name, tuned.inference_name) == ("bf16", "bf16")
    assert select_precision(cpu, "fp32", plain).inference_name == "fp32"
    with pytest.raises(device.SetupError, match="needs a CUDA GPU"):
        select_precision(cpu, "fp16")
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    slow = select_precision(cpu, "auto", plain)
    assert (slow.name, slow.inference_name) == ("fp32", "fp32") and "no bf16 hardware" in slow.reason
    with pytest.raises(device.SetupError, match="no bf16 hardware"):
        select_precision(cpu, "bf16")


@dataclasses.dataclass
class Recipe:
    model: str = "resnet50"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-4
    img_size: int = 224
    weight_decay: float = 1e-4
    ablation: bool = True
    ablation_epochs: int = 3


def test_quick_profile_then_explicit_flags_win():
    settings, hp = parse_args([], Recipe(), prog="x")
    assert (hp.epochs, hp.img_size, settings.train_size, settings.quick, settings.pretrained) == (10, 224, None, False, True)
    settings, hp = parse_args(["--quick"], Recipe(), prog="x", quick_overrides=dict(ablation_epochs=1))
    assert (hp.epochs, hp.img_size, hp.ablation_epochs) == (QUICK_PROFILE["epochs"], QUICK_PROFILE["img_size"], 1)
    assert (settings.train_size, settings.val_size, settings.test_size) == (2000, 500, 1000)
    settings, hp = parse_args(["--quick", "--epochs", "3", "--img-size", "96", "--no-ablation", "--weight-decay", "0",
                               "--no-pretrained", "--train-size", "300", "--ablation-epochs", "2"], Recipe(), prog="x",
                              quick_overrides=dict(ablation_epochs=1))
    assert (hp.epochs, hp.img_size, hp.ablation, hp.weight_decay, hp.ablation_epochs) == (3, 96, False, 0.0, 2)
    assert (settings.train_size, settings.val_size, settings.pretrained) == (300, 500, False)


def test_batches_cover_every_item_once_per_epoch_and_shards_split_them():
    x, y = torch.arange(103).float()[:, None], torch.arange(103)
    batches = TensorBatches(x, y, 10, shuffle=True, seed=1)
    epoch1, epoch2 = [torch.cat([b for _, b in batches]) for _ in range(2)]
    assert sorted(epoch1.tolist()) == list(range(103)) and not torch.equal(epoch1, epoch2)
    shards = [torch.cat([b for _, b in TensorBatches(x, y, 10, shuffle=True, seed=1, rank=r, world_size=2)])
              for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(103)) and len(set(shards[0].tolist()) & set(shards[1].tolist())) == 0


def test_frozen_batchnorm_keeps_its_statistics_while_the_rest_trains():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    freeze(model[:3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer("adamw", model.parameters(), 1e-2)
    set_train_mode(model)
    assert not model[1].training and model[4].training
    loss = model(torch.randn(8, 3, 8, 8) * 3 + 1).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for key in ["0.weight", "1.weight", "1.running_mean", "1.running_var"]:
        assert torch.equal(before[key], after[key]), key
    for key in ["3.weight", "4.running_mean", "7.weight"]:
        assert not torch.equal(before[key], after[key]), key


def test_fit_keeps_the_epoch_with_the_best_validation_accuracy(monkeypatch):
    """Validation accuracies 0.5, 0.9, 0.7: the model must end with epoch 2's weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    accuracies = iter([0.5, 0.9, 0.7])
    snapshots = []

    def fake_evaluate(m, batches, device, precision, **display):
        snapshots.append(m.weight.detach().clone())
        return training.Evaluation(1.0, next(accuracies), torch.zeros(1, 2), torch.zeros(1))

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    optimizer = make_optimizer("sgd", model.parameters(), 0.5)
    result = fit(model, TensorBatches(x, y, 16, shuffle=True), None, epochs=3, optimizer=optimizer, scheduler=None,
                 loss_fn=nn.CrossEntropyLoss(), device=torch.device("cpu"), precision=select_precision(torch.device("cpu")))
    assert result.best_epoch == 2 and result.best_val_accuracy == 0.9 and len(result.history) == 3
    assert torch.equal(model.weight, snapshots[1]) and not torch.equal(model.weight, snapshots[2])


def test_runner_explains_unknown_and_unbuilt_levels(tmp_path, monkeypatch):
    result = run_cli("run.py", "level", "7", timeout=60)
    assert result.returncode == 2 and "there is no level 7" in result.stdout
    import run
    monkeypatch.setitem(run.LEVEL_FILES, 3, "levels/does_not_exist.py")
    assert run._run_level(3, []) == 2


def test_runner_help_lists_the_common_flags():
    result = run_cli("run.py", "level", "1", "--help", timeout=60)
    assert result.returncode == 0
    for flag in ["--data-dir", "--out-dir", "--model", "--weights", "--no-pretrained", "--epochs", "--batch-size",
                 "--lr", "--img-size", "--seed", "--device", "--train-size", "--quick"]:
        assert flag in result.stdout, flag


def _resumable_run(tmp_path, stop_in_epoch=None, resume=False):
    """fit() on a small random problem whose every step draws random numbers (shuffle, dropout, a random
    per-batch transform, numpy in the loss), with a checkpoint; optionally killed part-way through an epoch."""
    import numpy as np

    device.seed_everything(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    val = TensorBatches(x[:32], y[:32], 16)
    noisy = lambda b: b + 0.1 * torch.randn_like(b)  # noqa: E731  (draws from torch's global generator)

    def loss_fn(logits, targets):  # draws from numpy's global generator, as timm's Mixup does
        return nn.functional.cross_entropy(logits, targets) * float(np.random.uniform(0.9, 1.1))

    optimizer = make_optimizer("adamw", model.parameters(), 1e-2)
    batches = TensorBatches(x, y, 16, shuffle=True, seed=5, transform=noisy)
    checkpoint = training.EpochCheckpoint(tmp_path / "ckpt.pt", dict(recipe=1), resume=resume)

    class Killer(training.NullDisplay):
        def advance(self, steps_done, images_per_second):
            if self.epoch == stop_in_epoch:  # the first progress report of that epoch
                raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs

        def begin_epoch(self, epoch, steps):
            self.epoch = epoch

    result = fit(model, batches, val, epochs=4, optimizer=optimizer,
                 scheduler=training.cosine_schedule(optimizer, 4 * len(batches)), loss_fn=loss_fn,
                 device=torch.device("cpu"), precision=select_precision(torch.device("cpu"), "fp32"),
                 display=Killer(), checkpoint=checkpoint)
    return result, model


def test_fit_resumed_after_a_kill_mid_epoch_ends_bit_identical(tmp_path):
    straight, straight_model = _resumable_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(tmp_path / "b", stop_in_epoch=3)
    stored = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert stored["epoch"] == 2  # the last finished epoch
    resumed, resumed_model = _resumable_run(tmp_path / "b", resume=True)
    assert resumed.resumed_epochs == 2 and untimed(resumed.history) == untimed(straight.history)
    assert resumed.best_epoch == straight.best_epoch
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    # without --resume nothing is read back: it starts over, and a different recipe is refused by name
    fresh, _ = _resumable_run(tmp_path / "b", resume=False)
    assert fresh.resumed_epochs == 0
    other = training.EpochCheckpoint(tmp_path / "b" / "ckpt.pt", dict(recipe=2), resume=True)
    with pytest.raises(device.SetupError, match="recipe: 1 there, 2 now"):
        other.load()
    (tmp_path / "b" / "ckpt.pt").write_bytes(b"truncated")
    with pytest.raises(device.SetupError, match="cannot be read"):
        other.load()
