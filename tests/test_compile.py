"""--compile: training through torch.compile keeps the files plain, and a machine without a working C++ compiler
gets one line and an eager run, never a traceback. `run.py bench --profile cpu` times each recipe four ways."""

from __future__ import annotations

import json

import torch

from conftest import run_cli

TINY = ["--quick", "--models", "cifarnet", "--train-size", "200", "--val-size", "100", "--test-size", "100",
        "--cifarnet-epochs", "1", "--cifarnet-batch-size", "50", "--cifarnet-widths", "8,16,16", "--no-tta"]


def test_compiled_training_keeps_plain_checkpoints_and_model_file(cifar_dir, tmp_path):
    result = run_cli("run.py", "level", "4", *TINY, "--compile", "--data-dir", str(cifar_dir),
                     "--out-dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    m = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert m["compile"] == {"used": True, "reason": "--compile"} and m["config"]["compile"] is True
    saved = torch.load(tmp_path / "level4" / "model.pt", weights_only=True)
    keys = list(saved["members"][0]["state_dict"])
    assert keys and not any("_orig_mod" in k for k in keys)  # the plain module's names, loadable without compile


def test_without_a_cpp_compiler_compile_is_one_line_and_the_run_goes_on_eagerly(cifar_dir, tmp_path):
    # inductor builds its C++ with $CXX: point it at nothing, as on a machine without a compiler
    result = run_cli("run.py", "level", "4", *TINY, "--compile", "--data-dir", str(cifar_dir),
                     "--out-dir", str(tmp_path), env={"CXX": "/nonexistent/c++"}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("--compile:")]
    assert len(lines) == 1 and "training eagerly instead" in lines[0]
    m = json.loads((tmp_path / "level4" / "metrics.json").read_text())
    assert m["compile"]["used"] is False and "torch.compile does not work" in m["compile"]["reason"]
    assert m["status"] == "complete"


def test_bench_profile_cpu_times_each_recipe_four_ways(cifar_dir, tmp_path):
    result = run_cli("run.py", "bench", "--profile", "cpu", "--quick", "--compile", "--level", "4",
                     "--model", "cifarnet", "--batch-size", "32", "--steps", "1", "--repeats", "1", "--no-level1-comparison",
                     "--data-dir", str(cifar_dir), "--out-dir", str(tmp_path), env={"CXX": "/nonexistent/c++"},
                     timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = report["recipes"]
    assert (row["model"], row["img_size"]) == ("cifarnet", 32)  # the profile's recipe: 32 px, not --quick's 64
    assert set(row["speeds"]) == {"eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16"}
    assert row["speeds"]["eager-fp32"] > 0 and row["chosen"] in row["speeds"]
    # --compile under --profile times nothing twice: the four ways hold the compiled ones
    assert row["compiled"] is None and "nothing is timed twice" in result.stdout
    assert (report["four_way_repeats"], report["eval_images"]) == (1, 128)  # --repeats 1; --quick's 128 images
    # no compiler here (CXX points at nothing): the compiled ways are not timed, and bench.md says why
    assert row["speeds"]["compiled-fp32"] is None and "torch.compile does not work" in row["notes"]["compiled-fp32"]
    assert row["fraction_of_peak"] is not None and row["fraction_of_peak"] > 0
    if row["precision"]["train"] == "fp32":  # the peak is an fp32 matrix product: bf16 training may pass it
        assert row["fraction_of_peak"] < 1.5
    # inference by batch size: the recipe's own batch against the GPU recipes' 256, both measured
    assert set(row["eval_batch_speeds"]) == {str(row["eval_batch_size"]), "256"}
    assert all(speed > 0 for speed in row["eval_batch_speeds"].values())
    # the baseline first, eager fp32 with glibc's default allocator; then the levels' allocator, recorded
    assert row["default_allocator_eager_fp32"] > 0
    assert row["speedup_over_default_allocator"]["eager-fp32"] == row["speeds"]["eager-fp32"] / row[
        "default_allocator_eager_fp32"]
    assert report["environment"]["allocator"].startswith("glibc malloc keeps freed memory")
    assert any(t["target"].startswith("Level 4: cifarnet: the chosen way ≥ 1.5x eager fp32 with glibc's default")
               for t in report["targets"])
    # what ran, on which code, and how long the whole benchmark took: the README's list of kept runs says it
    from common.runner.readme import readme_speed
    from common.training import code_version

    assert report["command"].startswith("run.py bench --profile cpu --quick") and report["started_at"]
    assert report["code_version"] == code_version() and report["total_seconds"] > 0
    kept = tmp_path / "results" / "cpu" / "bench"
    kept.mkdir(parents=True)
    (kept / "run.json").write_text((tmp_path / "bench.json").read_text())
    assert f"{report['total_seconds'] / 60:.1f} min in all" in "\n".join(readme_speed(tmp_path / "results"))
    bench_md = (tmp_path / "bench.md").read_text()
    assert "eager fp32, default allocator" in bench_md
    assert "each recipe four ways" in bench_md and "by batch size" in bench_md
