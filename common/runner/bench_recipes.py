"""What `python run.py bench` times: a Recipe per level (each level's bench_recipes() builds its own from its
hyperparameters), and the helpers the levels build them with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from common.models import create_model

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


