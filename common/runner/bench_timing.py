"""How `python run.py bench` times a recipe: the real pipeline against pre-staged inputs, FLOPs, the four ways
(eager or compiled, fp32 or bf16) and the default allocator. common/runner/bench.py runs it."""

from __future__ import annotations

import dataclasses
import itertools
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from common.device import select_precision, synchronize
from common.models import normalization
from common.runner.bench_recipes import Recipe
from common.runner.bench_report import SPEED_KEYS, chosen_mode
from common.training import TensorBatches, evaluate, make_optimizer, model_input, set_train_mode, train_one_epoch

# ----------------------------------------------------------------------------------------------------------
# Timing


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


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "no peak figure for CPUs: the FLOP/s achieved are reported alone"
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, source
    return None, f"no peak figure known for {name} (common/runner/bench_timing.py PEAK_TFLOPS)"


def peak_host_memory() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024




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
    from common.device import Precision, compiler_problem, cpu_has_fast_bf16

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
    from common.device import Precision

    torch.manual_seed(0)
    model = recipe.build().to(device, memory_format=torch.channels_last)
    result = measure_training(recipe, model, data, device, Precision("fp32", None, False, None, "bench"), steps,
                              repeats, upper_bound=False)
    return result["train_images_per_second"]


def compare_cpu_precisions(recipe: Recipe, model: nn.Module, data: dict, device, steps: int, repeats: int) -> dict:
    """On a CPU with bf16 hardware: training and evaluation speed in fp32 and in bf16, the evidence behind
    --precision auto's choice for this recipe's model."""
    from common.device import Precision

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
    from common.device import cpu_has_fast_bf16

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
