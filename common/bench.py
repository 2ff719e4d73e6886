"""`python run.py bench`: how close each level's training runs to what the device can do.

For each level's recipe (model, trainable part, image size, batch size, augmentation), on the current device:

- training images per second through the real pipeline: common.training.train_one_epoch over the level's
  own batches (uint8 images on the device, augmented, normalized and resized per batch), against the same
  loop, model, batch and image size fed pre-staged model inputs already on the device: the pipeline-free
  upper bound. pipeline_overhead = 1 - real / upper bound. The two are timed in turns (real, staged, real,
  staged, ...) and the ratio is taken per pair, then the median: a noisy machine (CPU cores shared with
  other work, GPU clocks) then moves both sides of each ratio together;
- evaluation images per second (common.training.evaluate over the real pipeline);
- the FLOPs of one training step (torch.utils.flop_counter: forward and backward, a multiply-add counted as
  2), the FLOP/s achieved and, on a GPU, their fraction of the device's peak (PEAK_TFLOPS, with its source);
- peak memory: host (getrusage; and what the data itself takes) and, on a GPU, device;
- for Level 1, the level's own main() end to end, 5 epochs, with cached features and with the frozen
  backbone run every epoch (--no-cache-features, the seed's way): the speedup, measured in the same run.

With --compile each recipe is also measured with torch.compile, and the table shows what that changes.
With --profile cpu each recipe is also timed four ways (eager or compiled, fp32 or bf16) and, first, in eager fp32
with glibc's default allocator (the baseline); those timings run the real pipeline only, without the staged turns.
The weights are random: speed does not depend on their values, and nothing has to be downloaded.
Writes OUT/bench.json and OUT/bench.md (summary.md links it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.data import load_cifar10, make_splits
from common.models import create_model, normalization
from common.progress import console
from common.io import write_json_atomic, write_text_atomic
from common.results import environment, provenance
from common.training import (
    TensorBatches, configure_backends, device_name, evaluate, make_optimizer, model_input, select_device,
    select_precision, set_train_mode, synchronize, train_one_epoch,
)

LEVEL_NUMBERS = (1, 2, 3, 4)

# --quick: the smoke profile's image size, and few steps. Level 1's end-to-end comparison runs on train,
# validation and test subsets in the full run's 4:1:1 proportions, so that its ratio carries over to a full
# run (the levels' --quick profile tests on 1,000 images against 2,000 for training, which would weigh the
# one-off test pass twice as much as a full run does).
# On a CPU every step synchronizes anyway, so turns of one step each pair the real and the staged step as
# closely in time as possible (other processes on the machine come and go within seconds); on a GPU a turn
# must be long enough for the pipeline to overlap the device's work, as it does in training.
# four_way_repeats and eval_images: under --profile each recipe is timed five more ways (four training modes, two
# inference batch sizes), two of them compiled; --quick times those with fewer turns and images, because the
# profile's recipes run at full size (128-224 px), where a 1-step turn of lite0 already takes about a second.
QUICK = dict(img_size=64, steps=1, repeats=9, four_way_repeats=5, eval_images=128, level1_sizes=(800, 200, 200))
FULL = dict(img_size=None, steps=20, repeats=5, four_way_repeats=5, eval_images=256, level1_sizes=(None, None, None))
LEVEL1_EPOCHS = 5

# Dense (no sparsity) FP16/BF16 tensor-core peak, TFLOP/s, from NVIDIA's product datasheets. Matched against
# torch.cuda.get_device_name() in this order (the first substring found wins).
PEAK_TFLOPS = [
    ("H200", 989.0, "NVIDIA H200 datasheet: BF16/FP16 Tensor Core, dense"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet (PCIe): BF16/FP16 Tensor Core, dense"),
    ("H100", 989.0, "NVIDIA H100 datasheet (SXM): BF16/FP16 Tensor Core, dense"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16/FP16 Tensor Core, dense"),
    ("L40S", 362.0, "NVIDIA L40S datasheet: BF16/FP16 Tensor Core, dense"),
    ("L40", 181.0, "NVIDIA L40 datasheet: BF16/FP16 Tensor Core, dense"),
    ("L4", 121.0, "NVIDIA L4 datasheet: BF16/FP16 Tensor Core, dense"),
    ("V100", 125.0, "NVIDIA V100 datasheet (SXM2): FP16 Tensor Core"),
    ("T4", 65.0, "NVIDIA T4 datasheet: FP16 Tensor Core (mixed precision)"),
]
T4_MEMORY = 16 * 1024**3  # the Colab GPU of the seed: every level's default batch must fit at 224 px


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak figure for CPUs: the FLOP/s achieved are reported alone"
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, source
    return None, f"no peak figure known for {name} (common/bench.py PEAK_TFLOPS)"


def peak_host_memory() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ----------------------------------------------------------------------------------------------------------
# Recipes: what each level trains. Each level's bench_recipes() builds its own; the runner hands them over


@dataclass
class Recipe:
    level: int
    name: str
    model: str
    img_size: int
    batch_size: int
    eval_batch_size: int
    trainable: str  # in words: "head", "last stage + head", "all" ...
    augmentation: str  # in words
    build: Callable[[], nn.Module]  # a fresh model (random weights), its trainable parameters set
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None  # uint8 N x 3 x 32 x 32 -> same, on the device
    mix: Callable | None = None  # (inputs, labels) -> (mixed inputs, soft targets), as train_one_epoch takes
    loss_fn: nn.Module = dataclasses.field(default_factory=nn.CrossEntropyLoss)


def chosen_mode(row: dict) -> str:
    """The way a level trains this recipe, as a key of row["speeds"]: eager or compiled, and its precision.

    A frozen backbone (Level 1's, trainable "head") only predicts, so it runs in the inference precision (bf16
    where the CPU has it in hardware); every other recipe in the training one (see select_precision)."""
    precision = row["precision"]
    mode = precision["inference"] if row["trainable"].startswith("head") else precision["train"]
    return f"{'compiled' if row.get('compile_default') else 'eager'}-{mode}"


def with_overrides(hp, overrides: dict, profiles: dict[str, dict] | None = None):
    """A level's Hyperparameters under the bench's --profile (the level's own profile of that name, e.g. its
    CPU_PROFILE), then with the bench's --model, --img-size and --batch-size (those given)."""
    profile = (profiles or {}).get(overrides.get("profile") or "", {})
    hp = dataclasses.replace(hp, **{k: v for k, v in profile.items() if hasattr(hp, k)})
    return dataclasses.replace(hp, **{k: v for k, v in overrides.items()
                                      if v is not None and hasattr(hp, k) and k != "profile"})


def random_timm_model(name: str, img_size: int, **kwargs) -> nn.Module:
    """A timm model with random weights; one whose input size is fixed at creation (a ViT) built for img_size."""
    import timm

    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = img_size
    return create_model(name, num_classes=10, pretrained=False, **kwargs)


def train_only_head(model: nn.Module) -> nn.Module:
    from common.models import train_only

    train_only(model, [model.get_classifier()])
    return model


def train_part(model: nn.Module, scope: str = "last-stage") -> nn.Module:
    """Level 2's and 3's trainable part: the last stage (or all), the head, and anything added on top (Level 3's
    SE block)."""
    from common.finetuning import fine_tune_scope
    from common.models import train_only

    backbone = getattr(model, "backbone", model)  # Level 3's SEClassifier keeps the timm model as .backbone
    extra = [m for name, m in model.named_children() if name not in ("backbone",)] if backbone is not model else []
    train_only(model, [*fine_tune_scope(backbone, scope), *extra, model.get_classifier()])
    return model


def collect_recipes(recipe_sources: dict[int, Callable[[dict], list[Recipe]] | str], levels: list[int],
                    overrides: dict) -> tuple[list[Recipe], list[dict]]:
    """Each level's recipes from the function its module exposes (bench_recipes, handed over by the runner);
    a level that is missing, or whose recipe cannot be read, is skipped with the reason (a string)."""
    recipes, skipped = [], []
    for level in levels:
        source = recipe_sources.get(level)
        if isinstance(source, str) or source is None:
            skipped.append(dict(level=level, reason=source or "no recipe"))
            continue
        try:
            recipes += source(overrides)
        except Exception as error:  # a level being rewritten must not stop the benchmark of the others
            skipped.append(dict(level=level, reason=f"its recipe could not be read ({type(error).__name__}: {error})"))
    return recipes, skipped


# ----------------------------------------------------------------------------------------------------------
# Timing


class FirstSteps:
    """The first `steps` batches of `batches`: each pass starts a new pass (a new shuffle) over the source."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, min(steps, len(batches))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.steps)


class Staged:
    """`steps` batches cycled from a few model inputs made in advance and kept on the device: no pipeline."""

    def __init__(self, batches: list, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def _one_hot_targets(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The staged stand-in for Mixup: soft targets for a soft-target loss, with no mixing work."""
    return x, F.one_hot(y, 10).float()


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's gradients, each as costly as the forward: one for the input, one for the weights.

    Replaces PyTorch's own formula, which counts a grouped convolution's weight gradient as if it were dense
    (measured with torch 2.14: a depthwise 64-channel 3x3 convolution's backward counted 64x its forward),
    and so inflates every EfficientNet's training FLOPs about tenfold.
    """
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def train_flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> float:
    """FLOPs of one training step (forward and backward) per image, counted by PyTorch on two images."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = x[:2], y[:2]
    targets = _one_hot_targets(x, y)[1] if recipe.mix else y
    set_train_mode(model)
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}) as counter:
        recipe.loss_fn(model(x), targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(y)


def measure_training(recipe: Recipe, model: nn.Module, data: dict, device, precision, steps: int,
                     repeats: int, upper_bound: bool = True) -> dict:
    """Real pipeline against pre-staged inputs for `model` (eager or compiled), in turns; medians.
    upper_bound=False: the real pipeline's turns only (images/s and the warm-up), at half the cost, for the
    comparisons that read nothing else (the four ways and the default allocator's baseline)."""
    train_images, train_labels = data["train"]
    mean, std = normalization(model)

    def transform(batch: torch.Tensor) -> torch.Tensor:
        return model_input(recipe.augment(batch) if recipe.augment else batch, recipe.img_size, mean, std)

    source = TensorBatches(train_images, train_labels, recipe.batch_size, shuffle=True, transform=transform,
                           drop_last=True)
    real = FirstSteps(source, steps)
    optimizer = make_optimizer(recipe.optimizer, model.parameters(), recipe.lr, recipe.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    staged_mix = _one_hot_targets if recipe.mix else None

    def run(batches, mix) -> tuple[float, float]:
        synchronize(device)
        _, _, seen, seconds = train_one_epoch(model, batches, optimizer, None, recipe.loss_fn, device, precision,
                                              scaler, mix)
        return seen / seconds, seconds

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # warm-up, out of the timing: cuDNN autotuning, the optimizer's state, lazy allocations, compilation
    _, warmup_seconds = run(FirstSteps(source, 1), recipe.mix)
    peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if not upper_bound:
        real_turns = [run(real, recipe.mix)[0] for _ in range(repeats)]
        return dict(train_images_per_second=statistics.median(real_turns), trials=[dict(real=r) for r in real_turns],
                    warmup_seconds=warmup_seconds, peak_device_memory_bytes=peak_device)
    # the upper bound's inputs: real model inputs (augmented, resized), made once and kept on the device
    staged_batches = [(x.detach().clone(), y) for x, y in FirstSteps(source, min(steps, 4))]
    staged = Staged(staged_batches, len(real))
    run(Staged(staged_batches, 1), staged_mix)
    trials = []
    for _ in range(repeats):
        real_ips, _ = run(real, recipe.mix)
        staged_ips, _ = run(staged, staged_mix)
        trials.append(dict(real=real_ips, staged=staged_ips, overhead=1 - real_ips / staged_ips))
    # a cross-check that noise can only lower: the fastest turn of each side
    best = 1 - max(t["real"] for t in trials) / max(t["staged"] for t in trials)
    # and the pipeline alone (batches made, nothing trained), short enough to repeat many times: on a CPU,
    # where the pipeline and the step run one after the other, it predicts the overhead as
    # pipeline / (pipeline + staged step); on a GPU it is an upper bound (the two overlap)
    pipeline = []
    for _ in range(3 * repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in real:
            pass
        synchronize(device)
        pipeline.append((time.perf_counter() - start) / len(real))
    pipeline_seconds = statistics.median(pipeline)
    step_seconds = recipe.batch_size / statistics.median(t["staged"] for t in trials)
    return dict(train_images_per_second=statistics.median(t["real"] for t in trials),
                upper_bound_images_per_second=statistics.median(t["staged"] for t in trials),
                pipeline_overhead=statistics.median(t["overhead"] for t in trials),
                pipeline_overhead_best_turns=best, trials=trials, pipeline_seconds_per_batch=pipeline_seconds,
                pipeline_share_estimate=pipeline_seconds / (pipeline_seconds + step_seconds),
                warmup_seconds=warmup_seconds, peak_device_memory_bytes=peak_device,
                staged_example=staged_batches[0])


def measure_evaluation(recipe: Recipe, model: nn.Module, data: dict, device, precision, images: int,
                       repeats: int) -> float:
    mean, std = normalization(model)
    val_images, val_labels = data["val"]
    batches = TensorBatches(val_images[:images], val_labels[:images], recipe.eval_batch_size,
                            transform=lambda b: model_input(b, recipe.img_size, mean, std))
    evaluate(model, FirstSteps(batches, 1), device, precision)  # warm-up
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        evaluate(model, batches, device, precision)  # ends with .item(): the device has finished
        rates.append(len(batches.labels) / (time.perf_counter() - start))
    return statistics.median(rates)


SPEED_KEYS = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16")


def measured_matmul_peak(device) -> float:
    """A CPU's attainable fp32 FLOP/s: the best of a few large matrix products (MKL's, the best-tuned kernel
    PyTorch has). The reference for `fraction of peak` on a CPU, where no datasheet figure fits a share of a
    virtual machine's cores."""
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def four_way_speeds(recipe: Recipe, model: nn.Module, data: dict, device, steps: int, repeats: int) -> dict:
    """Training images/s in each of eager fp32, eager bf16, compiled fp32 and compiled bf16 (`--profile`'s
    comparison), each through the real pipeline; None where a mode cannot run here, with the reason in `notes`.
    `compile_seconds`: the compiled modes' first step (compilation included)."""
    from common.training import Precision, compiler_problem, cpu_has_fast_bf16

    speeds, notes, compile_seconds = {}, {}, {}
    bf16_ok = device.type == "cuda" or cpu_has_fast_bf16()
    for key in SPEED_KEYS:
        mode, name = key.split("-")
        problem = compiler_problem() if mode == "compiled" else None
        if name == "bf16" and not bf16_ok:
            speeds[key], notes[key] = None, ("this CPU has no bf16 hardware (AMX or AVX512-BF16): bf16 is emulated, "
                                             "many times slower than fp32, so it is not timed")
            continue
        if problem:
            speeds[key], notes[key] = None, problem
            continue
        dtype = torch.bfloat16 if name == "bf16" else None
        torch._dynamo.reset()  # each compiled mode compiles afresh, so its first step counts its own compilation
        net = torch.compile(model) if mode == "compiled" else model
        result = measure_training(recipe, net, data, device, Precision(name, dtype, False, dtype, "bench"), steps,
                                  repeats, upper_bound=False)
        speeds[key] = result["train_images_per_second"]
        if mode == "compiled":
            compile_seconds[key] = result["warmup_seconds"]
    return dict(speeds=speeds, notes=notes, compile_seconds=compile_seconds)


def default_allocator_speed(recipe: Recipe, data: dict, device, steps: int, repeats: int) -> float:
    """Training images/s in eager fp32, timed as four_way_speeds() times it (run before the allocator is set)."""
    from common.training import Precision

    torch.manual_seed(0)
    model = recipe.build().to(device, memory_format=torch.channels_last)
    result = measure_training(recipe, model, data, device, Precision("fp32", None, False, None, "bench"), steps,
                              repeats, upper_bound=False)
    return result["train_images_per_second"]


def compare_cpu_precisions(recipe: Recipe, model: nn.Module, data: dict, device, steps: int, repeats: int) -> dict:
    """On a CPU with bf16 hardware: training and evaluation speed in fp32 and in bf16, the evidence behind
    --precision auto's choice for this recipe's model."""
    from common.training import Precision

    speeds = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        precision = Precision(name, dtype, False, dtype, "bench")
        trained = measure_training(recipe, model, data, device, precision, steps, repeats)
        speeds[name] = dict(train_images_per_second=trained["train_images_per_second"],
                            eval_images_per_second=measure_evaluation(recipe, model, data, device, precision,
                                                                      steps * recipe.batch_size, repeats))
    speeds["bf16_train_speedup"] = speeds["bf16"]["train_images_per_second"] / speeds["fp32"]["train_images_per_second"]
    speeds["bf16_eval_speedup"] = speeds["bf16"]["eval_images_per_second"] / speeds["fp32"]["eval_images_per_second"]
    return speeds


def bench_recipe(recipe: Recipe, data: dict, device, precision_flag: str, steps: int, repeats: int,
                 compile: bool, four_way: bool = False, epoch_images: int = 40_000, four_way_repeats: int = 5,
                 eval_images: int = 256) -> dict:
    from common.training import cpu_has_fast_bf16

    torch.manual_seed(0)
    model = recipe.build().to(device, memory_format=torch.channels_last)
    precision = select_precision(device, precision_flag, model)  # what the level itself would choose
    row = dict(level=recipe.level, name=recipe.name, model=recipe.model, img_size=recipe.img_size, compile_default=False,
               batch_size=recipe.batch_size, eval_batch_size=recipe.eval_batch_size, trainable=recipe.trainable,
               augmentation=recipe.augmentation,
               precision=precision.record(),
               trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
               total_parameters=sum(p.numel() for p in model.parameters()))
    eager = measure_training(recipe, model, data, device, precision, steps, repeats)
    x, y = eager.pop("staged_example")
    row.update(eager)
    row["eval_images_per_second"] = measure_evaluation(recipe, model, data, device, precision,
                                                       steps * recipe.batch_size, repeats)
    row["train_flops_per_image"] = train_flops_per_image(model, x, y, recipe)
    row["achieved_flops_per_second"] = row["train_flops_per_image"] * row["train_images_per_second"]
    peak, _ = peak_flops(device)
    row["peak_flops_per_second"] = peak
    row["fraction_of_peak"] = row["achieved_flops_per_second"] / peak if peak else None
    row["peak_host_memory_bytes"] = peak_host_memory()
    row["cpu_precisions"] = None
    if four_way:  # --profile: the four modes side by side, and the one the levels use
        row.update(four_way_speeds(recipe, model, data, device, steps, four_way_repeats))
        row["chosen"] = chosen_mode(row)
        measured = {k: v for k, v in row["speeds"].items() if v}
        row["fastest"] = max(measured, key=measured.get)
        # compile pays back when the seconds it saves over one epoch exceed its own cost
        for key, seconds in row["compile_seconds"].items():
            eager = row["speeds"][key.replace("compiled", "eager")]
            saved = epoch_images / eager - epoch_images / row["speeds"][key] if eager else None
            row.setdefault("compile_payback", {})[key] = dict(compile_seconds=seconds, epoch_seconds_saved=saved,
                                                              paid_back_in_one_epoch=bool(saved and saved > seconds))
        # Inference batch size: on a CPU a batch of 256 images at 128-224 px spills out of the caches, so the CPU
        # profile evaluates in small batches. Measured here against 256 (the GPU recipes' batch), on `eval_images`.
        sizes = sorted({recipe.eval_batch_size, 256})
        row["eval_batch_speeds"] = {str(size): measure_evaluation(dataclasses.replace(recipe, eval_batch_size=size),
                                                                  model, data, device, precision, eval_images,
                                                                  four_way_repeats)
                                    for size in sizes}
    elif device.type == "cpu" and cpu_has_fast_bf16():
        row["cpu_precisions"] = compare_cpu_precisions(recipe, model, data, device, steps, repeats)
    row["compiled"] = None
    if compile and not four_way:  # the four ways already include the compiled ones
        compiled = measure_training(recipe, torch.compile(model), data, device, precision, steps, repeats)
        compiled.pop("staged_example")
        compiled["speedup_over_eager"] = compiled["train_images_per_second"] / row["train_images_per_second"]
        compiled["compile_and_warmup_seconds"] = compiled.pop("warmup_seconds")
        row["compiled"] = compiled
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------------------------
# Level 1: cached features against the backbone every epoch, end to end


def level1_speedup(level1_main: Callable[[list[str]], int], model: str, img_size: int, sizes: tuple, data_dir,
                   device_choice: str) -> dict:
    """Level 1's main() twice, as a user runs it: with cached features, and with --no-cache-features.

    The time compared is the level's own record: features (when cached) and the 5 epochs (train_seconds),
    plus the test evaluation (test_seconds), i.e. everything after the data and the model are loaded.
    """
    train, val, test = sizes
    argv = ["--model", model, "--img-size", str(img_size), "--epochs", str(LEVEL1_EPOCHS), "--no-pretrained",
            "--device", device_choice, *(["--data-dir", str(data_dir)] if data_dir else [])]
    for flag, size in (("--train-size", train), ("--val-size", val), ("--test-size", test)):
        if size is not None:
            argv += [flag, str(size)]
    result = dict(epochs=LEVEL1_EPOCHS, model=model, img_size=img_size)
    quiet = console.quiet
    console.quiet = True  # the level's own table would bury the benchmark's
    try:
        with tempfile.TemporaryDirectory() as out:
            for key, flag in (("cached", "--cache-features"), ("recompute", "--no-cache-features")):
                code = level1_main([*argv, flag, "--out-dir", f"{out}/{key}"])
                if code != 0:
                    raise RuntimeError(f"Level 1 {flag} exited with code {code}")
                m = json.loads(Path(f"{out}/{key}/level1/metrics.json").read_text())
                result[f"{key}_seconds"] = m["train_seconds"] + m["test_seconds"]
                result.update(train_size=m["train_size"], val_size=m["val_size"], test_size=m["test_size"])
    finally:
        console.quiet = quiet
    result["speedup"] = result["recompute_seconds"] / result["cached_seconds"]
    return result


# ----------------------------------------------------------------------------------------------------------
# The run


def run_bench(recipe_sources: dict, level1_main: Callable | None = None, quick: bool = False,
              data_dir: str | None = None, out_dir: str = "outputs", device: str = "auto", compile: bool = False,
              levels: list[int] | None = None, model: str | None = None, img_size: int | None = None,
              batch_size: int | None = None, steps: int | None = None, repeats: int | None = None,
              level1_comparison: bool = True, precision_flag: str = "auto", profile_name: str | None = None) -> int:
    """The benchmark. `recipe_sources` maps each level to its bench_recipes function (or to the reason it has
    none); the runner, which knows the levels, collects them, so that common/ never imports a level."""
    from common.data import DataError
    from common.training import SetupError

    started, made = time.perf_counter(), provenance()
    unknown = [n for n in levels or [] if n not in LEVEL_NUMBERS]
    if unknown:
        console.print(f"[bold red]Error:[/] --level {unknown[0]}: levels are 1 to 4.", highlight=False)
        return 2
    profile = dict(QUICK if quick else FULL)
    if profile_name:  # the levels' own recipe under --profile: its image sizes, whatever --quick's
        profile["img_size"] = None
    profile.update({k: v for k, v in dict(img_size=img_size, steps=steps, repeats=repeats).items() if v is not None})
    if repeats is not None:  # --repeats: every timing takes that many turns
        profile["four_way_repeats"] = repeats
    overrides = dict(model=model, img_size=profile["img_size"], batch_size=batch_size, profile=profile_name)
    try:
        dev = select_device(device)
        precision = select_precision(dev, precision_flag)
        recipes, skipped = collect_recipes(recipe_sources, levels or list(LEVEL_NUMBERS), overrides)

        # the data, as every level holds it: uint8 arrays on the host, the splits' uint8 tensors on the device
        before = peak_host_memory()
        arrays, source = load_cifar10(data_dir)
        splits = make_splits(arrays, source)
        data_bytes = sum(a.nbytes for a in arrays.values())
        del arrays
        host = dict(data_bytes=data_bytes, data_load_peak_increase_bytes=peak_host_memory() - before)
        data = {name: (s.images.to(dev), s.labels.to(dev)) for name, s in (("train", splits.train), ("val", splits.val))}
    except (DataError, SetupError) as error:
        console.print(f"[bold red]Error:[/] {error}", highlight=False)
        return 2

    # On a CPU under --profile: each recipe in eager fp32 with the allocator as a process starts, *before*
    # configure_backends() has glibc keep freed memory (common.training.keep_freed_memory): that cannot be
    # undone exactly within a process, so the default comes first. The baseline the speed targets are judged on.
    default_allocator = {}
    if profile_name and dev.type == "cpu":
        console.print("Eager fp32 with glibc's default allocator first (the baseline) ...", highlight=False)
        for recipe in recipes:
            default_allocator[recipe.name] = default_allocator_speed(recipe, data, dev, profile["steps"],
                                                                     profile["four_way_repeats"])
    backends = configure_backends(dev)
    peak, peak_source = peak_flops(dev)
    if peak is None and profile_name:
        peak = measured_matmul_peak(dev)
        peak_source = (f"measured: the best of five 2048 x 2048 fp32 matrix products on this CPU, "
                       f"{peak / 1e9:.0f} GFLOP/s")
    report = dict(environment=dict(environment(dev, precision), **backends), device=device_name(dev),
                  precision=precision.name,
                  precision_flag=precision_flag,
                  profile="quick" if quick else "full", steps=profile["steps"], repeats=profile["repeats"],
                  four_way_repeats=profile["four_way_repeats"] if profile_name else None,
                  eval_images=profile["eval_images"] if profile_name else None,
                  recipe_profile=profile_name,
                  compile=compile, peak_flops_per_second=peak, peak_flops_source=peak_source,
                  host=host, recipes=[], skipped=skipped, level1_cache=None, **made)
    console.print(f"Benchmark on {report['device']} (--precision {precision_flag}), {report['profile']} profile: "
                  f"{profile['steps']} steps x {profile['repeats']} turns per measurement", highlight=False)
    for s in skipped:
        console.print(f"[yellow]Skipped level {s['level']}:[/] {s['reason']}", highlight=False)
    if compile and profile_name:
        console.print(f"--compile: --profile {profile_name} already times every recipe compiled (fp32 and bf16), "
                      f"so nothing is timed twice.", highlight=False)
    for recipe in recipes:
        console.print(f"{recipe.name}: {recipe.model} at {recipe.img_size} px, batch {recipe.batch_size} ...",
                      highlight=False)
        row = bench_recipe(recipe, data, dev, precision_flag, profile["steps"], profile["repeats"], compile,
                           four_way=bool(profile_name), four_way_repeats=profile["four_way_repeats"],
                           eval_images=profile["eval_images"])
        if recipe.name in default_allocator:
            row["default_allocator_eager_fp32"] = default_allocator[recipe.name]
            row["speedup_over_default_allocator"] = {k: v / default_allocator[recipe.name] if v else None
                                                     for k, v in row["speeds"].items()}
        if peak and row["fraction_of_peak"] is None:
            row["peak_flops_per_second"], row["fraction_of_peak"] = peak, row["achieved_flops_per_second"] / peak
        report["recipes"].append(row)
    if level1_comparison and any(r.level == 1 for r in recipes):
        level1_img = next(r.img_size for r in recipes if r.level == 1)
        console.print(f"Level 1: cached features against the backbone every epoch, {LEVEL1_EPOCHS} epochs ...",
                      highlight=False)
        level1_model = next(r.model for r in recipes if r.level == 1)
        report["level1_cache"] = level1_speedup(level1_main, level1_model, level1_img, profile["level1_sizes"],
                                                data_dir, device)
    host["peak_bytes"] = peak_host_memory()
    report["targets"] = judge_targets(report, dev)
    report["total_seconds"] = time.perf_counter() - started  # the whole benchmark, data and compiling included

    out = Path(out_dir)
    write_json_atomic(out / "bench.json", report)
    markdown = render_markdown(report)
    write_text_atomic(out / "bench.md", markdown)
    from common.summary import write_summary

    write_summary(out)
    _print_table(report)
    console.print(f"Wrote {out / 'bench.json'} and {out / 'bench.md'} (linked from {out / 'summary.md'})",
                  highlight=False)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Targets and the report


def judge_targets(report: dict, device: torch.device) -> list[dict]:
    """The issue's targets, each met (True), missed (False) or not measurable here (None), with the number."""
    targets = []
    for r in report["recipes"]:
        targets.append(dict(target=f"{r['name']}: pipeline_overhead ≤ 0.10", met=r["pipeline_overhead"] <= 0.10,
                            value=f"{r['pipeline_overhead']:.3f} (pipeline alone: {r['pipeline_share_estimate']:.3f} "
                                  f"of a step)"))
    for r in report["recipes"]:
        if r.get("default_allocator_eager_fp32") and r["speeds"].get(r["chosen"]):
            gain = r["speedup_over_default_allocator"][r["chosen"]]
            targets.append(dict(target=f"{r['name']}: the chosen way ≥ 1.5x eager fp32 with glibc's default "
                                       f"allocator (the levels before it kept freed memory)", met=gain >= 1.5,
                                value=f"{r['chosen']}: {gain:.2f}x"))
    for r in report["recipes"]:
        if r.get("speeds") and r["speeds"].get("eager-fp32"):
            best = r["speeds"][r["fastest"]] / r["speeds"]["eager-fp32"]
            targets.append(dict(target=f"{r['name']}: the fastest way ≥ 1.5x eager fp32", met=best >= 1.5,
                                value=f"{r['fastest']}: {best:.2f}x"))
    if report["level1_cache"]:
        speedup = report["level1_cache"]["speedup"]
        targets.append(dict(target="Level 1: cached features ≥ 4x faster than the backbone every epoch (5 epochs)",
                            met=speedup >= 4, value=f"{speedup:.2f}x"))
    host = report["host"]
    targets.append(dict(target="Host memory for the data ≤ 1 GB",
                        met=max(host["data_bytes"], host["data_load_peak_increase_bytes"]) <= 1e9,
                        value=f"{host['data_bytes'] / 1e6:.0f} MB of uint8 images; peak resident memory rose by "
                              f"{host['data_load_peak_increase_bytes'] / 1e6:.0f} MB while loading them"))
    at_224 = [r for r in report["recipes"] if r["img_size"] >= 224]
    if device.type == "cuda" and report["precision"] != "fp32" and at_224:
        worst = max(r["peak_device_memory_bytes"] for r in at_224)
        targets.append(dict(target="Every level's default batch fits a 16 GB GPU (T4) at 224 px, mixed precision",
                            met=worst <= T4_MEMORY and len(at_224) == len(report["recipes"]),
                            value=f"largest peak {worst / 2**30:.1f} GiB, measured on {report['device']}"))
    else:
        targets.append(dict(target="Every level's default batch fits a 16 GB GPU (T4) at 224 px, mixed precision",
                            met=None, value="not measured: needs a GPU run at 224 px (python run.py bench)"))
    return targets


def _mb(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f} MiB"


def _rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["recipes"]:
        frac = "—" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.1%}"
        rows.append([r["name"], f"{r['model']} @ {r['img_size']} px, batch {r['batch_size']}",
                     f"{r['precision']['train']} / {r['precision']['inference']}", r["trainable"],
                     r["augmentation"], f"{r['train_images_per_second']:,.1f}",
                     f"{r['upper_bound_images_per_second']:,.1f}", f"{r['pipeline_overhead']:.3f}",
                     f"{r['pipeline_overhead_best_turns']:.3f}",
                     f"{1000 * r['pipeline_seconds_per_batch']:,.1f} ms/batch = {r['pipeline_share_estimate']:.3f}",
                     f"{r['eval_images_per_second']:,.1f}", f"{r['train_flops_per_image'] / 1e9:.2f}",
                     f"{r['achieved_flops_per_second'] / 1e12:.3f}", frac, _mb(r["peak_device_memory_bytes"])])
    return rows


COLUMNS = ["recipe", "model", "precision (train / eval)", "trained", "augmentation", "train img/s (real)", "train img/s (staged)",
           "pipeline_overhead", "(best turns)", "pipeline alone", "eval img/s", "train GFLOP/img", "TFLOP/s", "of peak", "peak device mem"]


def render_markdown(report: dict) -> str:
    lines = ["# Benchmark", "",
             f"Measured by `python run.py bench{' --quick' if report['profile'] == 'quick' else ''}"
             f"{' --compile' if report['compile'] else ''}` on **{report['device']}** (--precision "
             f"{report.get('precision_flag', report['precision'])}: each recipe's choice in the precision column), "
             f"torch {report['environment']['torch']}, {report['profile']} profile: each figure is the median of "
             f"{report['repeats']} turns of {report['steps']} training steps, real pipeline and pre-staged inputs "
             f"in alternation. Random weights (speed does not depend on them).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    lines += ["", "- **pipeline_overhead** = 1 − real / staged: the share of training throughput lost to the input "
              "pipeline (batch slicing, augmentation, normalization, resize) against the "
              "same training step fed model inputs already on the device: the median over the turns of each "
              "turn's ratio. **(best turns)**: the same from the fastest real and the fastest staged turn, a "
              "cross-check (noise from other work on the machine can only slow a turn down). **pipeline alone**: "
              "the batches made without training, per batch (median), and as a share of a real step, "
              "pipeline / (pipeline + staged step): what the overhead is where the two run one after the other "
              "(a CPU), an upper bound where they overlap (a GPU).",
              "- **TFLOP/s**: the training step's FLOPs (PyTorch's FlopCounterMode, forward and backward, a "
              "multiply-add counted as 2) times the real images per second. Peak: "
              f"{report['peak_flops_source']}."]
    compiled = [r for r in report["recipes"] if r["compiled"]]
    if compiled:
        lines += ["", "## torch.compile", "", "| recipe | eager img/s | compiled img/s | speedup | compiled "
                  "pipeline_overhead | compile + warm-up |", "|---|---|---|---|---|---|"]
        for r in compiled:
            c = r["compiled"]
            lines.append(f"| {r['name']} | {r['train_images_per_second']:,.1f} | {c['train_images_per_second']:,.1f}"
                         f" | {c['speedup_over_eager']:.2f}x | {c['pipeline_overhead']:.3f} | "
                         f"{c['compile_and_warmup_seconds']:.0f} s |")
    four_way = [r for r in report["recipes"] if r.get("speeds")]
    if four_way:
        def cell(r, key):
            value = r["speeds"][key]
            return "—" if value is None else f"{value:,.1f}" + (" **fastest**" if key == r["fastest"] else "")

        lines += ["", f"## `--profile {report['recipe_profile']}`: each recipe four ways", "",
                  "Training images per second through the real pipeline (the median of "
                  f"{report.get('four_way_repeats') or report['repeats']} turns), for each way "
                  "to run the same recipe; — where a way cannot run here (reasons below). **levels use**: what "
                  "the levels run by default (--precision auto, --no-compile).", "",
                  "| recipe | model | eager fp32 | eager bf16 | compiled fp32 | compiled bf16 | compile s "
                  "(paid back in 1 epoch?) | TFLOP/s (of peak) | levels use |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in four_way:
            payback = "; ".join(f"{k.split('-')[1]} {v['compile_seconds']:.0f} s "
                                f"({'yes' if v['paid_back_in_one_epoch'] else 'no'})"
                                for k, v in (r.get("compile_payback") or {}).items()) or "—"
            frac = "" if r["fraction_of_peak"] is None else f" ({r['fraction_of_peak']:.0%})"
            lines.append(f"| {r['name']} | {r['model']} @ {r['img_size']} px, batch {r['batch_size']} | "
                         + " | ".join(cell(r, k) for k in SPEED_KEYS)
                         + f" | {payback} | {r['achieved_flops_per_second'] / 1e12:.3f}{frac} | {r['chosen']} |")
        sizes = sorted({int(b) for r in four_way for b in r.get("eval_batch_speeds", {})})
        if sizes:
            lines += ["", "Inference images per second (validation, test, Level 1's feature pass) by batch size, on "
                      f"{report.get('eval_images') or 256} validation images; **levels use** the recipe's own batch.", "",
                      "| recipe | " + " | ".join(f"batch {b}" for b in sizes) + " | levels use |",
                      "|---|" + "---|" * (len(sizes) + 1)]
            for r in four_way:
                speeds = r.get("eval_batch_speeds", {})
                lines.append(f"| {r['name']} | " + " | ".join(f"{speeds[str(b)]:,.1f}" if str(b) in speeds else "—"
                                                               for b in sizes) + f" | batch {r['eval_batch_size']} |")
        baseline = [r for r in four_way if r.get("default_allocator_eager_fp32")]
        if baseline:
            allocator = report["environment"].get("allocator", "?")
            lines += ["", "The same speeds against the baseline: eager fp32 with glibc's default allocator, timed "
                      "first, before the process switched to what the levels use: "
                      f"{allocator} (common.training.keep_freed_memory says why).", "",
                      "| recipe | eager fp32, default allocator | eager fp32 | levels use | levels use / baseline |",
                      "|---|---|---|---|---|"]
            for r in baseline:
                chosen = r["speeds"].get(r["chosen"])
                gain = r["speedup_over_default_allocator"].get(r["chosen"])
                lines.append(f"| {r['name']} | {r['default_allocator_eager_fp32']:,.1f} | "
                             f"{r['speeds']['eager-fp32']:,.1f} | {r['chosen']}: "
                             + ("—" if chosen is None else f"{chosen:,.1f}") + " | "
                             + ("—" if gain is None else f"{gain:.2f}x") + " |")
        notes = {note for r in four_way for note in r["notes"].values()}
        lines += [""] + [f"- —: {note}." for note in sorted(notes)]
        lines.append(f"- Peak: {report['peak_flops_source']}.")
    precisions = [r for r in report["recipes"] if r.get("cpu_precisions")]
    if precisions:
        lines += ["", "## CPU: fp32 against bf16", "",
                  "The same recipe in fp32 and under bf16 autocast (images per second; the median of the turns). "
                  "`--precision auto` uses bf16 for inference on a CPU with bf16 hardware, and for training only "
                  "where it is faster (not for models with depthwise convolutions).", "",
                  "| recipe | train fp32 | train bf16 | bf16 / fp32 | eval fp32 | eval bf16 | bf16 / fp32 | auto chose |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in precisions:
            c, chosen = r["cpu_precisions"], r["precision"]
            lines.append(f"| {r['name']} | {c['fp32']['train_images_per_second']:,.1f} | "
                         f"{c['bf16']['train_images_per_second']:,.1f} | {c['bf16_train_speedup']:.2f}x | "
                         f"{c['fp32']['eval_images_per_second']:,.1f} | {c['bf16']['eval_images_per_second']:,.1f} | "
                         f"{c['bf16_eval_speedup']:.2f}x | train {chosen['train']}, inference {chosen['inference']} |")
    l1 = report["level1_cache"]
    if l1:
        lines += ["", "## Level 1: cached features against the backbone every epoch", "",
                  f"Level 1's own run ({l1['model']} at {l1['img_size']} px, {l1['epochs']} epochs, "
                  f"{l1['train_size']:,} / {l1['val_size']:,} / {l1['test_size']:,} train / validation / test "
                  f"images), features (when cached), training, validation and the test evaluation: "
                  f"**{l1['cached_seconds']:.1f} s** with cached features, **{l1['recompute_seconds']:.1f} s** "
                  f"running the frozen backbone every epoch (the original assessment's way): **{l1['speedup']:.2f}x**."]
    host = report["host"]
    lines += ["", "## Memory", "",
              f"- Host: the data (all 60,000 images, uint8) takes {host['data_bytes'] / 1e6:.0f} MB; peak resident "
              f"memory rose by {host['data_load_peak_increase_bytes'] / 1e6:.0f} MB while loading it; the whole "
              f"benchmark process peaked at {host['peak_bytes'] / 1e6:,.0f} MB (models, PyTorch and all).",
              "- Device: " + ("peak allocated per recipe in the table (training at the recipe's batch, with the "
                              "train split on the device)." if report["environment"]["device_type"] == "cuda"
                              else "not measured (no GPU in this run).")]
    lines += ["", "## Targets", "", "| target | met | value |", "|---|---|---|"]
    for t in report["targets"]:
        mark = {True: "✅", False: "❌", None: "➖ not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {mark} | {t['value']} |")
    for s in report["skipped"]:
        lines.append(f"\nSkipped level {s['level']}: {s['reason']}.")
    return "\n".join(lines) + "\n"


def _print_table(report: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Benchmark: {report['device']} (--precision {report.get('precision_flag', report['precision'])}), "
                        f"{report['profile']} profile",
                  title_justify="left")
    shown = [i for i, name in enumerate(COLUMNS)  # the others are in bench.md (and precision in the lines below)
             if name not in ("precision (train / eval)", "trained", "augmentation")]
    for i in shown:
        table.add_column(COLUMNS[i], justify="left" if i < 2 else "right")
    for row in _rows(report):
        table.add_row(*(row[i] for i in shown))
    console.print(table)
    for r in report["recipes"]:
        if r.get("cpu_precisions"):
            c = r["cpu_precisions"]
            console.print(f"{r['name']}, bf16 against fp32 on this CPU: training {c['bf16_train_speedup']:.2f}x, "
                          f"evaluation {c['bf16_eval_speedup']:.2f}x; auto chose training {r['precision']['train']}, "
                          f"inference {r['precision']['inference']}", highlight=False)
    l1 = report["level1_cache"]
    if l1:
        console.print(f"Level 1, {l1['epochs']} epochs end to end: cached features {l1['cached_seconds']:.1f} s, "
                      f"backbone every epoch {l1['recompute_seconds']:.1f} s: {l1['speedup']:.2f}x", highlight=False)
    for r in report["recipes"]:
        if r["compiled"]:
            console.print(f"torch.compile, {r['name']}: {r['compiled']['speedup_over_eager']:.2f}x over eager",
                          highlight=False)
    for t in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        console.print(f"target {mark}: {t['target']} ({t['value']})", highlight=False)
