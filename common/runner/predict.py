"""Predict with a saved model (OUT/levelN/model.pt) on any image file: `python run.py predict IMAGE`.

An image goes the way CIFAR-10's images went, then the way the test set went during training:
  1. PIL opens it; transparency is laid over white, everything becomes 8-bit RGB;
  2. the centre square is cropped (CIFAR's images are square; squashing would distort the object) and shrunk
     to 32 x 32 with PIL's Lanczos filter (see load_image);
  3. from there it is a CIFAR image like any other: uint8 3 x 32 x 32, to the device, then
     common.training.model_input with the saved img_size, mean and std, the model in eval mode, softmax, in
     the inference precision a level picks for its test set with --precision auto (select_precision).

What a model file holds (written by common.runner.results.LevelRun.save_model):
  kind "timm"      a timm model (Levels 1 and 2), rebuilt with timm.create_model(pretrained=False)
  kind "se"        Level 3's SE network: rebuilt by a builder the caller passes (common/ does not import levels/)
  kind "cifarnet"  common/cifarnet.py's from-scratch network (a Level 4 member), rebuilt from its `widths`
  kind "ensemble"  Level 4: `members`, each a "timm", "se" or "cifarnet" entry of its own; the probabilities are
                   the members' softmax averaged over their test-time views (common.augment.tta_views: identity,
                   flip, the four shifts of --tta-shifts, CifarNet's translations; a member's own `views`, else
                   the file's `tta_views`), each calibrated by its `vote_temperatures` entry (softmax(log p / T);
                   none in older files), then combined with the members' `vote_weights`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# torch is imported inside the functions: a wrong path or a level that has not run is reported at once.

MODEL_FORMAT = "cifar10-levels model v1"  # as common.runner.results.MODEL_FORMAT (not imported: results pulls in more)


class PredictError(Exception):
    """A problem with what the user asked to predict (no model, not an image...). The message is for the user."""


Builder = Callable[[dict, int], Any]  # (a model entry of the file, number of classes) -> the nn.Module


# ----------------------------------------------------------------------------------------------------------
# Which model


def find_model(out_dir: Path, level: int | None = None) -> tuple[int, Path, str | None]:
    """-> (level, OUT/levelN/model.pt, a warning or None). Default: the highest level whose run is complete
    and saved a model."""
    from common.records import LEVEL_NUMBERS, load_metrics

    out_dir = Path(out_dir)
    runs = load_metrics(out_dir) if out_dir.is_dir() else {}
    if level is None:
        done = [n for n, m in runs.items() if m.get("status") == "complete" and (out_dir / f"level{n}" / "model.pt").is_file()]
        if not done:
            raise PredictError(f"No level has completed with a saved model in '{out_dir}'. Run one first "
                               f"(`python run.py level 1 --out-dir {out_dir}`), or point --out-dir at the folder "
                               f"the levels wrote to.")
        level = max(done)
    if level not in LEVEL_NUMBERS:
        raise PredictError(f"--level {level}: levels are {LEVEL_NUMBERS[0]} to {LEVEL_NUMBERS[-1]}.")
    path = out_dir / f"level{level}" / "model.pt"
    if not path.is_file():
        ran = f" (its run is {runs[level]['status']})" if level in runs else ""
        raise PredictError(f"Level {level} has no saved model in '{out_dir}' (no {path}){ran}. Run it first: "
                           f"`python run.py level {level} --out-dir {out_dir}`.")
    status = runs.get(level, {}).get("status")
    warning = None if status == "complete" else (
        f"Level {level}'s last run is '{status}'; {path} is the model an earlier run saved.")
    return level, path, warning


# ----------------------------------------------------------------------------------------------------------
# Loading it


@dataclass
class Member:
    name: str
    model: Any  # nn.Module, in eval mode
    img_size: int
    mean: tuple
    std: tuple
    weight: float = 1.0
    views: tuple[str, ...] = ("identity",)
    temperature: float = 1.0  # Level 4 calibrates each member before its vote: softmax(log p / temperature)


@dataclass
class SavedModel:
    level: int | None
    kind: str
    description: str
    classes: list[str]
    members: list[Member]
    views: tuple[str, ...] = ("identity",)
    path: Path | None = None
    meta: dict = field(default_factory=dict)


def build_timm(entry: dict, num_classes: int):
    import timm

    return timm.create_model(entry["model"], pretrained=False, num_classes=num_classes)


def build_cifarnet(entry: dict, num_classes: int):
    from common.cifarnet import CifarNet

    return CifarNet(tuple(int(w) for w in entry["widths"]), num_classes=num_classes)


def _member(entry: dict, num_classes: int, builders: dict[str, Builder], name: str, weight: float, device,
            views: tuple[str, ...] = ("identity",), temperature: float = 1.0) -> Member:
    import torch

    kind = entry.get("kind")
    builder = {"timm": build_timm, "cifarnet": build_cifarnet, **builders}.get(kind)
    if builder is None:
        raise PredictError(f"The saved model '{name}' is of kind '{kind}', which this command cannot rebuild"
                           + ("" if kind != "se" else " (no builder for Level 3's SE network was given)") + ".")
    model = builder(entry, num_classes)
    try:
        model.load_state_dict(entry["state_dict"])
    except RuntimeError as error:
        raise PredictError(f"The saved weights of '{name}' do not fit {entry.get('model')} "
                           f"({str(error).strip().splitlines()[0][:200]}).") from None
    model = model.to(device, memory_format=torch.channels_last).eval()
    return Member(name, model, int(entry["img_size"]), tuple(entry["mean"]), tuple(entry["std"]), weight, views,
                  temperature)


def load_saved_model(path: Path, builders: dict[str, Builder] | None = None, device="cpu") -> SavedModel:
    """Rebuild the network(s) of a model file, in eval mode on `device`."""
    import torch

    from common.augment import tta_views

    device = torch.device(device)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, or not a torch file at all
        raise PredictError(f"'{path}' cannot be read as a saved model ({type(error).__name__}: "
                           f"{str(error)[:200]}). Run the level again to rewrite it.") from None
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise PredictError(f"'{path}' is not a model file of this project (format "
                           f"{saved.get('format') if isinstance(saved, dict) else type(saved).__name__!r}, "
                           f"expected '{MODEL_FORMAT}').")
    builders, classes = builders or {}, list(saved["classes"])
    kind = saved.get("kind")
    # the test-time views the level averaged: Level 4's per member (a member's own views win), Level 3's mirror
    views = tuple(saved.get("tta_views") or ("identity",))
    entries = saved["members"] if kind == "ensemble" else [saved]
    member_views = [tuple(e.get("views") or views) for e in entries]
    known = list(tta_views(tta=True, shifts=True, translates=True))
    unknown = sorted({v for vs in member_views for v in vs if v not in known})
    if unknown:
        raise PredictError(f"'{path}' asks for test-time views {unknown}; this command knows {known}.")
    if kind == "ensemble":
        votes = saved.get("vote_weights") or {}
        raw = [float(votes.get(e["name"], 1.0)) for e in entries]
        temperatures = saved.get("vote_temperatures") or {}  # each member's calibration (1.0: none)
        members = [_member(e, len(classes), builders, e["name"], w / sum(raw), device, vs,
                           float(temperatures.get(e["name"], 1.0))) for e, w, vs in zip(entries, raw, member_views)]
        description = "ensemble of " + ", ".join(
            f"{m.name} ({m.weight:.2f}{f', {len(m.views)} views' if len(m.views) > 1 else ''})" for m in members)
    else:
        members = [_member(saved, len(classes), builders, saved.get("model", "model"), 1.0, device, views)]
        description = (saved.get("model", "?") + (" + SE" if kind == "se" else "") + f" at {saved.get('img_size')} px"
                       + (f", {len(views)} views ({', '.join(views)})" if len(views) > 1 else ""))
    meta = {k: v for k, v in saved.items() if k not in ("state_dict", "members")}
    return SavedModel(saved.get("level"), kind, description, classes, members, views, Path(path), meta)


# ----------------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path):
    """Any image file -> (uint8 tensor 3 x 32 x 32, its original width x height), as CIFAR-10's images were made.

    CIFAR-10's images are web images shrunk to 32 x 32 (the 80 Million Tiny Images collection); how each was
    framed is not documented. Here the centre square is cropped first (CIFAR's objects are mostly centred and
    square, and squashing a wide photo would distort them), then shrunk with PIL's Lanczos filter: a high-quality, antialiasing filter (its
    kernel widens with the shrink factor, so every source pixel counts), unlike nearest-neighbour or plain
    bilinear sampling, which alias badly when a photo shrinks 30-fold. A 32 x 32 image (a CIFAR image saved
    as a file) passes through unchanged.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise PredictError(f"'{path}' does not exist.")
    if path.is_dir():
        raise PredictError(f"'{path}' is a folder, not an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large but allowed: shrunk below
            with Image.open(path) as image:
                image.load()  # PIL reads lazily: a truncated file fails here, not later
                size = image.size
                if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                    rgba = image.convert("RGBA")
                    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                image = image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise PredictError(f"'{path}' is too large to open safely ({error}). Shrink it first, e.g. to at most "
                           f"4000 x 4000 pixels.") from None
    except UnidentifiedImageError:
        raise PredictError(f"'{path}' is not an image PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF...).") from None
    except PermissionError:
        raise PredictError(f"'{path}' cannot be read: permission denied.") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupted data
        raise PredictError(f"'{path}' cannot be read as an image (truncated or corrupted?): "
                           f"{type(error).__name__}: {error}") from None
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (32, 32):
        image = image.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0)  # box-reduce huge images first
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(32, 32, 3)
    return pixels.permute(2, 0, 1).contiguous(), size


# ----------------------------------------------------------------------------------------------------------
# Predicting


def predict_probabilities(saved: SavedModel, images, precision: str = "auto"):
    """uint8 N x 3 x 32 x 32 -> N x classes probabilities (float32, CPU): each member's softmax averaged over
    the views, calibrated by its temperature, then weighted by the members' weights (one member, one view:
    plain softmax)."""
    import torch

    from common.augment import tta_views
    from common.device import autocast, select_precision
    from common.training import model_input

    views = tta_views(tta=True, shifts=True, translates=True)
    total = None
    for member in saved.members:
        device = next(member.model.parameters()).device
        chosen = select_precision(device, precision, member.model)  # as the level chose it for its test set
        x = images.to(device)
        probs = 0
        for view in member.views:
            with torch.no_grad(), autocast(device, chosen):
                logits = member.model(model_input(views[view](x), member.img_size, member.mean, member.std))
            probs = probs + logits.float().softmax(1).cpu() / len(member.views)
        if member.temperature != 1.0:  # Level 4's calibration: softmax(log p / T), as levels/level4_expert.py
            probs = (probs.clamp_min(1e-12).log() / member.temperature).softmax(1)
        total = member.weight * probs if total is None else total + member.weight * probs
    return total
