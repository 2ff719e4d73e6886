"""Where and in what precision a run computes, and how it repeats: the device, the precision, backend
settings, and the seeds.

Every level calls these through LevelRun.setup() (common/runner/results.py); the training loop
(common/training.py) uses autocast() and the Precision chosen here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import distributed

# ----------------------------------------------------------------------------------------------------------
# Device and precision


class SetupError(Exception):
    """A problem with the run's setup (device, weights, flags). The message is meant for the user, as is."""


def select_device(choice: str = "auto") -> torch.device:
    """The device to run on. Under torchrun this also joins the process group: each process gets its own GPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda was asked for, but PyTorch sees no CUDA GPU here. "
                         "Use --device auto or --device cpu.")
    if choice not in ("cpu", "cuda"):
        raise SetupError(f"--device must be auto, cpu or cuda, not '{choice}'.")
    if choice == "cuda" and distributed.local_rank() >= torch.cuda.device_count():
        raise SetupError(f"torchrun started more processes on this machine than it has GPUs "
                         f"({torch.cuda.device_count()}): use --nproc_per_node={torch.cuda.device_count()}.")
    return distributed.init(torch.device(choice))


@dataclass(frozen=True)
class Precision:
    """How the model computes: one dtype while it trains, one while it only predicts.

    They differ on a CPU, where bf16 speeds up inference but can slow training down (see select_precision).
    """

    name: str  # what training uses: "bf16", "fp16" or "fp32"
    autocast_dtype: torch.dtype | None  # training
    use_grad_scaler: bool
    inference_dtype: torch.dtype | None = None
    reason: str = ""

    @property
    def inference_name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.inference_dtype, "fp32")

    def record(self) -> dict:
        return dict(train=self.name, inference=self.inference_name, reason=self.reason)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AMX or AVX512-BF16), where oneDNN makes it fast.

    Elsewhere PyTorch still runs bf16 on a CPU, but emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust oneDNN's own answer
        flags = ""
    hardware = any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16")) if flags else True
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    return hardware and torch.backends.mkldnn.is_available() and bool(supported())


def has_depthwise_convolutions(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
                                     for m in model.modules())


def select_precision(device: torch.device, choice: str = "auto", model: nn.Module | None = None) -> Precision:
    """The precision to train and to predict in, with the reason, for --precision auto|fp32|bf16|fp16.

    GPU, auto: bf16 on Ampere and newer (compute capability >= 8.0), fp16 with loss scaling below that.
    Decided by compute capability, not by torch.cuda.is_bf16_supported(): that answers True on a T4 (7.5),
    which only emulates bf16 and runs it several times slower than fp16.
    CPU, auto: measured on a 2-core Xeon with AMX, bf16 autocast runs inference 1.8-2.8x faster than fp32 and
    trains ResNet50 and ViT-S about 2x faster, but trains EfficientNets 30-40% *slower* (depthwise
    convolutions have no fast bf16 backward). So inference uses bf16 wherever the CPU has it in hardware, and
    training uses it only for a model without depthwise convolutions; fp32 otherwise.
    """
    if choice not in PRECISIONS:
        raise SetupError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{choice}'.")
    bf16, fp16 = torch.bfloat16, torch.float16
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if choice == "bf16" and major < 8:
            raise SetupError(f"--precision bf16: this GPU (compute capability {major}.{minor}) has no bf16 units "
                             f"(they start at 8.0, Ampere); use --precision fp16 or auto.")
        if choice == "fp32":
            return Precision("fp32", None, False, None, "asked for with --precision fp32")
        if choice == "bf16" or (choice == "auto" and major >= 8):
            return Precision("bf16", bf16, False, bf16, f"compute capability {major}.{minor} has bf16 units")
        return Precision("fp16", fp16, True, fp16, f"compute capability {major}.{minor}: fp16 with loss scaling")
    # CPU
    if choice == "fp16":
        raise SetupError("--precision fp16 needs a CUDA GPU: CPUs have no fast fp16. Use auto, bf16 or fp32.")
    fast = cpu_has_fast_bf16()
    if choice == "bf16":
        if not fast:
            raise SetupError("--precision bf16: this CPU has no bf16 hardware (AMX or AVX512-BF16), so bf16 would "
                             "be emulated and slower than fp32. Use --precision auto or fp32.")
        return Precision("bf16", bf16, False, bf16, "asked for with --precision bf16")
    if choice == "fp32" or not fast:
        return Precision("fp32", None, False, None, "asked for with --precision fp32" if choice == "fp32" else
                         "this CPU has no bf16 hardware (AMX or AVX512-BF16)")
    if has_depthwise_convolutions(model):
        return Precision("fp32", None, False, bf16, "CPU with bf16 hardware: bf16 for inference; fp32 for training, "
                         "because this model's depthwise convolutions train slower in bf16 on a CPU")
    if model is None:
        return Precision("fp32", None, False, bf16, "CPU with bf16 hardware: bf16 for inference")
    return Precision("bf16", bf16, False, bf16, "CPU with bf16 hardware: bf16 for inference and training")


def compiler_problem() -> str | None:
    """None when torch.compile works here, else one line saying why not (checked once, on a tiny function).

    On a CPU, inductor writes C++ and builds it with the system's compiler: a machine without one (or with a
    broken one) gets this line instead of a traceback, and the run goes on eagerly."""
    global _COMPILER_PROBLEM
    if _COMPILER_PROBLEM is None:
        try:
            probe = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
            probe(torch.ones(8))
            _COMPILER_PROBLEM = ""
        except Exception as error:  # a missing compiler shows up as one of several exception types
            first = (str(error).strip().splitlines() or [""])[0][:160]
            _COMPILER_PROBLEM = f"torch.compile does not work on this machine ({type(error).__name__}: {first})"
    return _COMPILER_PROBLEM or None


_COMPILER_PROBLEM: str | None = None


def keep_freed_memory() -> str:
    """Have glibc's malloc keep the memory PyTorch frees, for the next training step to reuse. Returns what was
    done, for the record (metrics.json's environment, bench.json).

    Why: by default glibc hands every large block back to the operating system as soon as it is freed: a batch's
    activations (tens of MB each) are unmapped at the end of every step and mapped afresh in the next, and every
    4 KiB page of them costs a page fault and is zeroed again. Measured on Level 3's CPU recipe (lite0+SE at 128
    px, batch 64) on the 2-core AMD EPYC: 53,000-61,000 page faults per step, 7% of the CPU time in the kernel,
    and in a whole run 300,000 faults a second; a virtual machine pays more per fault, and unevenly (the same
    run has trained at 79 and at 58 images/s on the same machine). M_MMAP_MAX = 0 serves large blocks from the
    heap as well, and a trim threshold of 2 GiB keeps the heap's free top: after the first step the same pages
    are reused (500-900 faults a step). The price: the process keeps its peak memory (+0.2-0.5 GB here).
    Only glibc has mallopt (Linux; not macOS or Windows, which keep the default)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "default (no glibc mallopt here)"
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    if mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1:
        return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"
    return "default (mallopt refused)"


def configure_backends(device: torch.device, deterministic: bool = False) -> dict:
    """Backend settings for `device`; returns those worth recording (metrics.json's environment)."""
    recorded = {}
    if device.type == "cpu":
        recorded["allocator"] = keep_freed_memory()
    if device.type == "cuda":
        # fixed input shapes: let cuDNN try its kernels once and keep the fastest (the one nondeterminism left)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True, warn_only=True)
    return recorded


def autocast(device: torch.device, precision: Precision, training: bool = False):
    """Mixed precision for a forward pass: the training dtype when `training`, else the inference dtype."""
    dtype = precision.autocast_dtype if training else precision.inference_dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    # The vector capability is part of the name: two "AMD EPYC" hosts, one AVX2 and one AVX-512 with bf16
    # hardware, train at different speeds and in different precisions, so their records must not read alike.
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = ", bf16 hardware" if cpu_has_fast_bf16() else ""
    return (f"CPU ({cpu_model_name() or platform.processor() or platform.machine()}, {capability}{bf16}, "
            f"{torch.get_num_threads()} threads)")


def cpu_model_name() -> str | None:
    """The processor's name as Linux reports it ("AMD EPYC", "Intel(R) Xeon(R) ..."); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None



def synchronize(device: torch.device) -> None:
    """Wait for the GPU to finish its queued work (for timing); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# Same seed, same numbers


def seed_everything(seed: int) -> None:
    """Seed every random generator a run draws from: Python's, numpy's (timm's Mixup draws from it) and torch's.

    On a CPU two runs with the same seed and flags then give identical numbers. On a GPU, cuDNN's autotuner
    (cudnn.benchmark) may pick different kernels from run to run, whose sums round differently: expect the
    last digits to differ unless --deterministic is given.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global random state, in types that torch.load(weights_only=True) accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), position=int(position),
                            has_gauss=int(has_gauss), cached=float(cached)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


