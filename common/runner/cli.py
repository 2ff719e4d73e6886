"""The flags every level takes, standalone (`python levels/levelN_*.py ...`) and through `python run.py level N ...`.

A level's hyperparameters are a dataclass in the level file. The common flags below set the common fields
(model, epochs, batch size, learning rate, image size); every other field of the dataclass becomes a flag
of its own (`weight_decay` -> `--weight-decay`, a bool `ablation` -> `--ablation/--no-ablation`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from common.device import PRECISIONS

# The smoke profile: small enough to finish Level 1 in well under a minute on a 2-core CPU.
# Its numbers are not comparable with a full run (a tenth of the test set, one epoch, tiny images).
QUICK_PROFILE = dict(train_size=2000, val_size=500, test_size=1000, epochs=1, img_size=64)

HYPERPARAMETER_FLAGS = ("model", "epochs", "batch_size", "lr", "img_size")
SPLIT_SIZES = dict(train_size=40_000, val_size=10_000, test_size=10_000)  # the most each split holds


@dataclass
class RunSettings:
    """Where and how to run; not part of a level's recipe."""

    data_dir: str | None = None
    out_dir: str = "outputs"
    weights: str | None = None
    pretrained: bool = True
    device: str = "auto"
    seed: int = 42
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    quick: bool = False
    profile: str | None = None  # None: the original (GPU) recipe, not asked for by name
    profile_chosen: str | None = None  # why this profile: "asked for (--profile cpu)" or "chosen: no CUDA GPU here"
    precision: str = "auto"
    compile: bool = False
    resume: bool = False
    deterministic: bool = False


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and output")
    data.add_argument("--data-dir", help="CIFAR-10 location: a folder with cifar-10-batches-py/, an image folder "
                      "(train/<class>/*.png|jpg, test/<class>/...), or a folder to download into. "
                      "Default: $CIFAR10_DIR, else ./data")
    data.add_argument("--out-dir", help="where results go (default: outputs)")
    data.add_argument("--train-size", type=int, help="train on a stratified subset of the 40,000-image train split")
    data.add_argument("--val-size", type=int, help="validate on a stratified subset of the 10,000 (smoke runs)")
    data.add_argument("--test-size", type=int, help="test on a stratified subset of the 10,000 (smoke runs; "
                      "not comparable)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="any timm model name")
    model.add_argument("--weights", help="local pretrained weights (a timm state dict) instead of downloading")
    model.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                       help="random initialization instead of ImageNet weights")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--img-size", type=int, help="the model's input size; images are resized on the device")
    train.add_argument("--seed", type=int, help="seed for initialization and shuffling (the split is fixed)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"])
    train.add_argument("--precision", choices=list(PRECISIONS),
                       help="auto (default): bf16 on Ampere+ GPUs, fp16 with loss scaling on older ones; on a CPU "
                            "bf16 where it has bf16 hardware and it is faster (inference always, training only for "
                            "models without depthwise convolutions), else fp32")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="train through torch.compile (default: off; on this project's 2-core CPU it was no "
                            "faster: see the README's benchmark). Without a working C++ compiler: eager, said once")
    train.add_argument("--deterministic", action="store_const", const=True,
                       help="on a GPU, deterministic kernels and no cuDNN autotuning: the same numbers every run, "
                            "somewhat slower (a CPU run is deterministic already)")
    train.add_argument("--quick", action="store_const", const=True,
                       help=f"smoke profile for a CPU: {QUICK_PROFILE}; explicit flags win")
    train.add_argument("--profile", help="the recipe: 'gpu', the original assessment's (ResNet50/ViT at 224 px), "
                       "or 'cpu', the full data on a CPU with ImageNet-pretrained EfficientNet-Lite models at reduced "
                       "image sizes (docs/cpu-profile.md). Default: 'cpu' where there is no CUDA GPU, else 'gpu'. "
                       "Explicit flags win")
    train.add_argument("--resume", action="store_const", const=True,
                       help="continue from the last finished epoch saved in OUT/levelN/checkpoints/ (the same "
                            "flags and code are required). With nothing to resume, says so and starts fresh")


def _field_type(cls, f: dataclasses.Field):
    kind = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def build_parser(hyperparameters, prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_arguments(parser)
    level = parser.add_argument_group("this level's hyperparameters")
    for f in dataclasses.fields(hyperparameters):
        if f.name in HYPERPARAMETER_FLAGS:
            continue
        default = getattr(hyperparameters, f.name)
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(type(hyperparameters), f)
        if kind is bool:
            level.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default: {default})")
        else:
            level.add_argument(flag, type=kind, help=f"(default: {default})")
    parser.set_defaults(**{k: None for k in vars(parser.parse_args([]))})
    return parser


def parse_args(argv: list[str] | None, hyperparameters, prog: str, description: str = "",
               quick_overrides: dict | None = None, profiles: dict[str, dict] | None = None):
    """-> (RunSettings, hyperparameters): defaults, then --profile, then the --quick profile, then the flags
    given explicitly. A value no run can use (0 epochs, a subset larger than its split...) stops here, exit 2."""
    parser = build_parser(hyperparameters, prog, description)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values = {**dataclasses.asdict(RunSettings()), **dataclasses.asdict(hyperparameters)}
    profiles = {"gpu": {}, **(profiles or {})}  # gpu: the original recipe, the dataclass's own defaults
    if "profile" in given:
        if given["profile"] not in profiles:
            parser.error(f"unknown --profile '{given['profile']}'; this level has: {', '.join(profiles)}")
        given["profile_chosen"] = f"asked for (--profile {given['profile']})"
    elif "cpu" in profiles and not cuda_in_use(given.get("device", "auto")):
        # a newcomer's first command on a laptop: the GPU recipe would take days on a CPU
        given["profile"] = "cpu"
        given["profile_chosen"] = ("chosen: --device cpu" if given.get("device") == "cpu"
                                   else "chosen: no CUDA GPU here")
    if "profile" in given:
        values.update(profiles[given["profile"]])
    if given.get("quick"):
        values.update(QUICK_PROFILE)
        values.update(quick_overrides or {})
    values.update(given)
    for message in _invalid(values, dataclasses.asdict(hyperparameters)):
        parser.error(message)
    settings = RunSettings(**{f.name: values[f.name] for f in dataclasses.fields(RunSettings)})
    hp = dataclasses.replace(hyperparameters, **{f.name: values[f.name] for f in dataclasses.fields(hyperparameters)})
    if settings.profile_chosen and settings.profile_chosen.startswith("chosen"):
        from common.progress import console

        why = "--device cpu" if settings.device == "cpu" else "No CUDA GPU here"
        data = "--quick's subsets" if settings.quick else "the whole data set"
        console.print(f"{why}: training the CPU profile ({recipe_words(hp)}, {data}; docs/cpu-profile.md). "
                      f"`--profile gpu` trains the original GPU recipe instead.", highlight=False)
    return settings, hp


def cuda_in_use(device_flag: str) -> bool:
    """Would a run with this --device train on a CUDA GPU?"""
    if device_flag == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def recipe_words(hp) -> str:
    """The profile's model and image size in words, for the line that says which profile runs."""
    models = getattr(hp, "models", None) or getattr(hp, "model", "")
    return f"{models.replace(',', ', ')} at {hp.img_size} px"


def _invalid(values: dict, defaults: dict) -> list[str]:
    """What is wrong with the merged flags, each as a message naming the flag. `defaults`: the level's own
    hyperparameters, unchanged; a count whose default is 0 may be 0 (it turns something off, as Level 4's
    --low-res-epochs 0 turns off progressive resizing)."""
    problems = []
    for key in ("epochs", "batch_size", "img_size"):
        if values.get(key) is not None and values[key] < 1:
            problems.append(f"--{key.replace('_', '-')} must be at least 1, not {values[key]}")
    for key, most in SPLIT_SIZES.items():
        size = values.get(key)
        if size is not None and not 10 <= size <= most:
            problems.append(f"--{key.replace('_', '-')} {size}: a stratified subset needs at least 10 images (one "
                            f"per class) and at most the {most:,} of its split")
    for key, value in values.items():  # a level's other sizes and counts (--ablation-epochs, --eval-batch-size,
        # the SE block's --reduction / --se-reduction, a divisor)
        least = 0 if defaults.get(key) == 0 else 1
        if key.endswith(("_epochs", "_batch_size", "reduction")) and isinstance(value, int) and value < least:
            problems.append(f"--{key.replace('_', '-')} must be at least {least}, not {value}")
    return problems
