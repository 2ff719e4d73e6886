"""The GPU user's first run, exercised on a CPU: fit()'s fp16-with-GradScaler branch (a Colab T4's) and its bf16
branch (an A100's), with the same fit() the levels train with, a tiny model and a few steps each.

PyTorch runs both on a CPU: autocast("cpu", float16) and GradScaler("cpu"). No GPU has been lent to this project,
so these are the only runs these branches have had. A user's `--precision fp16` on a CPU is still refused
(tests/test_engine.py): the CPU has no fast fp16, so the branch is reached here by building the Precision a GPU
would get.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.device import Precision
from common.training import EpochCheckpoint, NullDisplay, TensorBatches, fit, make_optimizer

CPU = torch.device("cpu")
FP16 = Precision("fp16", torch.float16, True, torch.float16, "what a T4 gets (select_precision)")
BF16 = Precision("bf16", torch.bfloat16, False, torch.bfloat16, "what an A100 gets (select_precision)")
OVERFLOW = 1e4  # inputs this large overflow fp16's gradients at every loss scale from 2**16 down to 2**8


def _problem(overflowing_batch: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    if overflowing_batch:
        x[:16] *= OVERFLOW  # the first batch of every epoch (no shuffle)
    return model, TensorBatches(x, y, 16), TensorBatches(torch.randn(32, 8), torch.randint(0, 4, (32,)), 16)


class StopIn(NullDisplay):
    """Stands in for a kill: raises at the first progress report of epoch `epoch`."""

    def __init__(self, epoch: int | None):
        self.stop, self.epoch = epoch, 0

    def begin_epoch(self, epoch, steps):
        self.epoch = epoch

    def advance(self, steps_done, images_per_second):
        if self.epoch == self.stop:
            raise KeyboardInterrupt


def _fit(tmp_path, precision, epochs=3, stop_in=None, resume=False, overflowing_batch=True):
    model, train, val = _problem(overflowing_batch)
    optimizer = make_optimizer("sgd", model.parameters(), 0.05)
    checkpoint = EpochCheckpoint(tmp_path / "ckpt.pt", dict(recipe="tiny"), resume=resume)
    result = fit(model, train, val, epochs=epochs, optimizer=optimizer, scheduler=None,
                 loss_fn=nn.CrossEntropyLoss(), device=CPU, precision=precision, display=StopIn(stop_in),
                 checkpoint=checkpoint)
    return result, model, torch.load(tmp_path / "ckpt.pt", weights_only=True)


def test_fp16_with_grad_scaler_skips_an_overflowing_step_instead_of_training_on_it(tmp_path):
    """One batch whose scaled fp16 gradients overflow: GradScaler finds the inf, skips the optimizer's step (the
    weights stay as they were) and halves its scale; the loss itself was finite, so the run goes on."""
    model, _, _ = _problem(overflowing_batch=True)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(_problem(overflowing_batch=True)[1]))
    one_batch = TensorBatches(x, y, 16)
    optimizer = make_optimizer("sgd", model.parameters(), 0.05)
    result = fit(model, one_batch, one_batch, epochs=1, optimizer=optimizer, scheduler=None,
                 loss_fn=nn.CrossEntropyLoss(), device=CPU, precision=FP16,
                 checkpoint=EpochCheckpoint(tmp_path / "ckpt.pt", dict(recipe="tiny"), resume=False))
    stored = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not trained on
    assert stored["scaler"]["scale"] == 2.0**15  # 2**16, halved once
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))

    # the same batch at a normal scale trains: the step is skipped only when the gradients overflow
    model, train, _ = _problem(overflowing_batch=False)
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, train, train, epochs=1, optimizer=make_optimizer("sgd", model.parameters(), 0.05), scheduler=None,
        loss_fn=nn.CrossEntropyLoss(), device=CPU, precision=FP16)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_scaler_state_is_saved_and_restored_by_resume(tmp_path):
    """Every epoch halves the scale once (its overflowing batch), so the scale after epoch 3 is 2**13 only when
    --resume restored epoch 1's 2**15: a fresh scaler would end at 2**14. Weights bit-identical to a straight run."""
    straight, straight_model, straight_stored = _fit(tmp_path / "straight", FP16)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", FP16, stop_in=2)
    stored = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert stored["epoch"] == 1 and stored["scaler"]["scale"] == 2.0**15
    resumed, resumed_model, resumed_stored = _fit(tmp_path / "killed", FP16, resume=True)
    assert resumed.resumed_epochs == 1
    assert straight_stored["scaler"]["scale"] == resumed_stored["scaler"]["scale"] == 2.0**13
    assert all(torch.equal(a, b) for a, b in zip(straight_model.state_dict().values(),
                                                 resumed_model.state_dict().values()))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_bf16_trains_in_bf16_without_a_scaler_and_resumes(tmp_path):
    """The A100 branch: autocast to bf16 in training and in evaluation, no GradScaler (bf16 has fp32's range)."""
    seen = []
    model, train, val = _problem(overflowing_batch=False)
    model[0].register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, train, val, epochs=2, optimizer=make_optimizer("sgd", model.parameters(), 0.05),
                 scheduler=None, loss_fn=nn.CrossEntropyLoss(), device=CPU, precision=BF16)
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert {training for training, _ in seen} == {True, False}  # training steps and validation both ran in bf16
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]

    straight, straight_model, stored = _fit(tmp_path / "straight", BF16, overflowing_batch=False)
    assert stored["scaler"] is None
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "killed", BF16, stop_in=3, overflowing_batch=False)
    resumed, resumed_model, _ = _fit(tmp_path / "killed", BF16, resume=True, overflowing_batch=False)
    assert resumed.resumed_epochs == 2
    assert all(torch.equal(a, b) for a, b in zip(straight_model.state_dict().values(),
                                                 resumed_model.state_dict().values()))
