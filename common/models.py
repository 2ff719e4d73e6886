"""timm models with pretrained weights from the hub (default) or from a local file (--weights), and clear errors."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from common.training import SetupError

OFFLINE_HELP = ("On a machine without internet, pass --weights FILE (a timm state dict for this model) "
                "or --no-pretrained (random initialization).")


def create_model(name: str, num_classes: int = 10, pretrained: bool = True, weights: str | None = None,
                 **kwargs) -> nn.Module:
    """timm.create_model with the classifier replaced by a fresh `num_classes`-way head.

    `weights` loads a local state dict instead of downloading (timm's pretrained_cfg_overlay file=...);
    timm reads it with torch.load(weights_only=True), so a checkpoint cannot run code on load.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise SetupError(f"--model '{name}' is not a timm model." + (f" Similar names: {', '.join(close)}." if close else ""))
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise SetupError(f"--weights '{weights}' does not exist or is not a file.")
        pretrained, kwargs["pretrained_cfg_overlay"] = True, dict(file=str(path))
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as error:
        if not pretrained:
            raise
        if weights is not None:
            raise SetupError(f"--weights '{weights}' could not be loaded into {name}: "
                             f"{type(error).__name__}: {str(error)[:400]}") from None
        raise SetupError(f"Could not download the pretrained weights of {name} "
                         f"({type(error).__name__}: {str(error)[:300]}).\n{OFFLINE_HELP}") from None


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the model was pretrained with (ImageNet's for most timm models)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
