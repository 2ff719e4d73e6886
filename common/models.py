"""timm models with pretrained weights from the hub (default) or from a local file (--weights), and clear errors."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.device import SetupError

OFFLINE_HELP = ("On a machine without internet, pass --weights FILE (a timm state dict for this model) "
                "or --no-pretrained (random initialization).")


def create_model(name: str, num_classes: int = 10, pretrained: bool = True, weights: str | None = None,
                 **kwargs) -> nn.Module:
    """timm.create_model with the classifier replaced by a fresh `num_classes`-way head.

    `weights` loads a local state dict instead of downloading (timm's pretrained_cfg_overlay file=...);
    timm reads it with torch.load(weights_only=True), so a checkpoint cannot run code on load.
    """
    import timm

    check_model_name(name)
    if weights is not None:
        pretrained, kwargs["pretrained_cfg_overlay"] = True, dict(file=str(weight_file(weights)))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as error:
        if not pretrained:
            raise
        if weights is not None:
            detail = str(error)
            if "size mismatch" in detail or "Missing key" in detail or "Unexpected key" in detail:
                detail = (f"its tensors do not fit {name} (a state dict for another architecture?); "
                          f"first problem: {detail.strip().splitlines()[-1].strip()[:200]}")
            raise SetupError(f"--weights '{weights}' could not be loaded into {name}: "
                             f"{type(error).__name__}: {detail[:400]}") from None
        raise SetupError(f"Could not download the pretrained weights of {name} "
                         f"({type(error).__name__}: {str(error)[:300]}).\n{OFFLINE_HELP}") from None


def weight_file(weights: str) -> Path:
    """--weights FILE as a path, or a SetupError when there is no such file."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SetupError(f"--weights '{weights}' does not exist or is not a file.")
    return path


def weight_pairs(flag: str) -> dict[str | None, str]:
    """--weights as {NAME: FILE}: NAME=FILE pairs (comma-separated, Level 4's members), or one bare FILE, which
    comes back as {None: FILE}. Both forms in one flag is a SetupError: which member would the bare file be for?"""
    items = [item.strip() for item in flag.split(",") if item.strip()]
    bare = [item for item in items if "=" not in item]
    if bare and len(items) > 1:
        raise SetupError(f"--weights '{flag}': give one FILE, or NAME=FILE pairs for every file (e.g. "
                         f"efficientnet_lite0=a.pth,efficientnet_lite1=b.pth), not '{bare[0]}' beside others.")
    if bare:
        return {None: bare[0]}
    return dict(item.split("=", 1) for item in items)


def weight_files(flag: str | None) -> list[Path]:
    """Every file that --weights names (FILE, or NAME=FILE pairs for Level 4), checked to exist: run at setup, so
    that a mistyped path stops the run before the data loads, not after."""
    return [weight_file(f) for f in weight_pairs(flag).values()] if flag else []


def check_model_name(name: str, flag: str = "--model") -> None:
    """A SetupError naming `flag` and the closest timm names when timm has no model `name`."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=6, cutoff=0.5)
        raise SetupError(f"{flag} '{name}' is not a timm model." + (f" Closest timm names: {', '.join(close)}."
                                                                    if close else " See timm.list_models()."))


def zero_head(model: nn.Module) -> nn.Module:
    """Start the new classifier at zero, i.e. from uniform predictions (loss ln 10 = 2.30), and return it.

    timm initializes some classifiers for training from scratch, wide enough that a probe on large features
    starts at a loss of 6 or more, and whose first large random gradients damage pretrained features when the
    backbone trains too (a pretrained efficientnet_lite0 stayed near chance for two smoke epochs that way)."""
    head = model.get_classifier()
    for p in head.parameters():
        nn.init.zeros_(p)
    return head


def check_input_size(model: nn.Module, img_size: int, name: str) -> None:
    """Stop with a message when the model cannot take img_size x img_size inputs: smaller than its total
    downsampling (a CNN's last stage would see less than one pixel of image, the rest padding), or failing a
    probe forward pass (one image, eval mode, so that no BatchNorm statistic moves)."""
    import torch

    info = getattr(model, "feature_info", None) or getattr(getattr(model, "backbone", None), "feature_info", None)
    stride = info[-1].get("reduction") if info else None
    if stride and img_size < stride:
        raise SetupError(f"--img-size {img_size} is too small for {name}: it downsamples by {stride}, so an image "
                         f"below {stride} px vanishes into padding. Use --img-size {max(stride, 32)} or more.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except Exception as error:
        raise SetupError(f"--img-size {img_size} is too small for {name} ({type(error).__name__}: "
                         f"{str(error)[:160]}). Use a larger --img-size (32 is CIFAR's own).") from None
    finally:
        model.train(was_training)


def pretrained_tag(model: nn.Module) -> str | None:
    """The exact weights a timm model was built with, e.g. 'resnet50.tv_in1k'."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture, tag = cfg.get("architecture"), cfg.get("tag")
    return f"{architecture}.{tag}" if architecture and tag else architecture


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model was pretrained with (ImageNet's for most timm models)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


# What is not the feature extractor: the pooled head, which forward_head runs (and a head has no "last stage").
_HEAD_NAMES = {"global_pool", "head_drop", "flatten", "fc", "classifier", "head"}


def last_stage(model: nn.Module) -> list[nn.Module]:
    """The modules that "fine-tune the last stage" trains, besides the head: the deepest stage of the backbone
    and whatever runs between it and the pooled head.

    ResNet: [layer4]. EfficientNet (lite0, b0): [blocks[6], conv_head, bn2], the last block stage and the 1x1
    convolution (with its BatchNorm) that widens it to the 1,280 features the head sees. Found through timm's
    feature_info (its last entry names the last stage), so it works for any timm CNN.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise SetupError(f"{type(model).__name__} does not list its stages (no timm feature_info), so its last "
                         f"stage cannot be found; use a timm CNN such as resnet50 or efficientnet_lite0.")
    name = info[-1]["module"]  # e.g. "layer4" or "blocks.6"
    stage = [model.get_submodule(name)]
    children = [n for n, _ in model.named_children()]
    for child in children[children.index(name.split(".")[0]) + 1:]:  # what runs after it, up to the head
        module = getattr(model, child)
        if child not in _HEAD_NAMES and list(module.parameters()):
            stage.append(module)
    return stage


def freeze_first_stages(model: nn.Module, count: int) -> None:
    """Keep the stem and the first `count` stages of a timm CNN at their pretrained weights: the layers that
    compute the first `count` feature maps of its feature_info (strides 2, 4, ... 2**count). `model` may wrap
    the timm network (Level 3's SEClassifier).

    Why: the backward pass stops at the first trainable layer, so the frozen layers cost a forward pass only.
    The first stages work at the highest resolution, where depthwise convolutions are slowest: freezing
    EfficientNet-Lite0's stem and two stages trains it 1.4x faster at 128 px on a 2-core CPU (docs/cpu-profile.md).
    What they compute (edges, colour blobs) is the part of ImageNet features that transfers best (Yosinski et al.,
    "How transferable are features in deep neural networks?", 2014). Their BatchNorms keep ImageNet's statistics
    (common.training.set_train_mode).
    """
    network = next((m for m in model.modules() if getattr(m, "feature_info", None)), None)
    if network is None:
        raise SetupError(f"{type(model).__name__} does not list its stages (no timm feature_info), so its first "
                         f"stages cannot be frozen; use a timm CNN such as resnet50 or efficientnet_lite0.")
    stages = [info["module"] for info in network.feature_info]
    if not 0 < count < len(stages):
        raise SetupError(f"--frozen-stages {count}: {type(network).__name__} has {len(stages)} stages "
                         f"({', '.join(stages)}); freeze 1 to {len(stages) - 1} of them, or 0 for none.")
    last, inside = stages[count - 1], False
    for name, module in network.named_modules():  # in the order they run: the stem, then stage after stage
        if name == last or name.startswith(last + "."):
            inside = True
        elif inside:
            break
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(False)


def train_only(model: nn.Module, modules: list[nn.Module]) -> None:
    """Freeze every parameter of `model`, then make the parameters of `modules` trainable again.

    The frozen layers' BatchNorm statistics stay frozen too: common.training.set_train_mode keeps a BatchNorm
    without trainable parameters in eval mode.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
