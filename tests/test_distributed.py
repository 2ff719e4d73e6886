"""Multi-process training: sharding that keeps the batches of a one-process run, and Level 1 under torchrun
(2 processes, gloo on the CPU) against the same run in one process."""

from __future__ import annotations

import json

import pytest
import torch

from common.distributed import interleave
from common.training import TensorBatches
from conftest import run_cli


def test_shards_of_each_training_step_make_up_the_one_process_batch():
    n, batch, world = 203, 16, 2  # 203 is odd: one image per epoch is left out so that every process takes 13 steps
    data = torch.arange(n)
    whole = TensorBatches(data, data, batch, shuffle=True, seed=7)
    shards = [whole.shard(rank, world, training=True) for rank in range(world)]
    assert [len(s) for s in shards] == [13, 13] and {s.batch_size for s in shards} == {batch // world}
    for epoch in range(2):  # a fresh shuffle every epoch, the same one in every process
        one_process = [x for x, _ in whole]
        per_rank = [[x for x, _ in s] for s in shards]
        for step, expected in enumerate(one_process[:12]):  # the 12 full steps are the same batches exactly
            assert sorted(torch.cat([p[step] for p in per_rank]).tolist()) == sorted(expected.tolist())
        seen = torch.cat([torch.cat(p) for p in per_rank])
        assert len(seen) == n - 1 and len(set(seen.tolist())) == n - 1
    with pytest.raises(Exception, match="does not split evenly"):
        whole.shard(0, 3, training=True)


def test_evaluation_shards_cover_every_image_once_and_come_back_in_order():
    n, world = 11, 3
    data = torch.arange(n) * 10
    whole = TensorBatches(data, data, 4)
    parts = [torch.cat([x for x, _ in whole.shard(rank, world, training=False)]) for rank in range(world)]
    assert sorted(torch.cat(parts).tolist()) == data.tolist()
    longest = max(len(p) for p in parts)  # gather_in_order pads every share to the longest before all_gather
    padded = [torch.cat([p, p.new_full((longest - len(p),), -1)]) for p in parts]
    assert torch.equal(interleave(padded, n), data)


# --device cpu: two processes with gloo on any host (on a one-GPU machine, --device auto would give both the GPU)
SMOKE = ["--quick", "--profile", "gpu", "--device", "cpu", "--model", "efficientnet_lite0", "--img-size", "48", "--epochs", "2", "--lr", "0.01",
         "--batch-size", "32", "--train-size", "320", "--val-size", "200", "--test-size", "200"]


def test_level1_under_torchrun_matches_one_process(cifar_dir, lite0_weights, tmp_path):
    """Same seed and global batch: 2 processes take the same steps on the same batches as 1 process.

    Each process sees half of each batch, DDP averages the two half-batch gradients (the full-batch
    gradient), and the metrics are summed over both processes: what differs is float rounding only.
    A run that did not shard (each process on every image, in batches of 16) or that reported one process's
    half only would be off by far more than these tolerances. --no-cache-features trains the whole model
    (a frozen backbone and the head) under DDP, as levels 2-4 do.
    """
    flags = [*SMOKE, "--weights", str(lite0_weights), "--data-dir", str(cifar_dir)]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    runs = {
        "one": ["levels/level1_baseline.py", *flags],
        "two": [*torchrun, "levels/level1_baseline.py", *flags],
        "two-live": [*torchrun, "levels/level1_baseline.py", *flags, "--no-cache-features"],
    }
    metrics, stdout = {}, {}
    for name, cmd in runs.items():
        result = run_cli(*cmd, "--out-dir", str(tmp_path / name), timeout=180, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout + result.stderr
        metrics[name] = json.loads((tmp_path / name / "level1" / "metrics.json").read_text())
        stdout[name] = result.stdout

    one = metrics["one"]
    assert one["environment"]["processes"] == 1
    # the head must really have learned something, or matching the single-process run would prove nothing
    assert one["history"][-1]["train_accuracy"] > 0.4 and one["test_accuracy"] > 0.25
    for name, tolerance in [("two", 1e-4), ("two-live", 1e-3)]:  # live vs cached: float noise of two paths
        m = metrics[name]
        assert m["environment"]["processes"] == 2 and m["status"] == "complete"
        assert len(m["history"]) == len(one["history"]) == 2
        for a, b in zip(one["history"], m["history"]):
            assert abs(a["train_loss"] - b["train_loss"]) < tolerance, (name, a, b)
            assert abs(a["val_loss"] - b["val_loss"]) < tolerance, (name, a, b)
            assert abs(a["train_accuracy"] - b["train_accuracy"]) <= 1 / 320 + 1e-9, (name, a, b)
            assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / 200 + 1e-9, (name, a, b)
        assert abs(one["test_accuracy"] - m["test_accuracy"]) <= 1 / 200 + 1e-9
        # rank 0 alone prints and writes
        assert sum(line.startswith("epoch ") for line in stdout[name].splitlines()) == 2, stdout[name]
        assert stdout[name].count("Level 1: test accuracy") == 1
        assert not list((tmp_path / name).rglob("*.partial"))
