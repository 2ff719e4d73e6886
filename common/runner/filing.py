"""results/: the kept records of finished full-data runs, and how a run is filed there.

An output folder (outputs/ by default) is scratch: it is rewritten by the next run and never committed. A run
worth keeping is filed with `python run.py record --level N --from OUT_DIR`:

- OUT_DIR/levelN/metrics.json is copied to results/cpu/levelN.json (a `--profile cpu` run on a CPU) or
  results/gpu/levelN.json (the default recipe on a GPU), with a `record` entry added: the git commit whose code
  the run ran (found from the run's code_version, never assumed), and where its figures were put;
- the run's figures are copied into docs/img/ as small PNGs (level3-confusion-matrix.png, ...), so that
  the README can show them and the whole of docs/img stays under IMG_BUDGET_BYTES (1 MB).

The README's results table and pictures are generated from these records (common/runner/readme.py, `python run.py
summary --readme`): a number in the README is always one that a kept record holds.

A record holds no local path: its data, output and weights folders become placeholders (DATA, OUT, WEIGHTS/...;
common/runner/placeholders.py), and what the data is stays in its `data` (format, counts, content fingerprint).

Only a run that finished (`complete`) on the whole data set is filed; a smoke run (`--quick`), a run on a
subset, or one that is still running, was interrupted or failed is refused with the reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.io import write_json_atomic
from common.records import LEVEL_NUMBERS, effective_status, metrics_path
from common.runner.placeholders import OUT, describe_missing_data, scrub_paths

ROOT = Path(__file__).resolve().parents[2]  # the repository: common/runner/filing.py is two folders down
RESULTS_DIR = ROOT / "results"
IMG_DIR = ROOT / "docs" / "img"
RECORD_KINDS = ("cpu", "gpu")  # results/cpu: the CPU profile on a CPU; results/gpu: the default recipe on a GPU

# The whole data set: the fixed split of the 50,000 training images and the official test set (common/data.py).
FULL_SIZES = dict(train_size=40_000, val_size=10_000, test_size=10_000)

# The figures kept per level (the keys a level gives run.add_figure): those the README can show
# (common/runner/readme.py's PICTURES). The others (Level 2's ablation chart, Level 4's per-member curves) stay in the
# output folder: docs/img has a budget.
KEPT_FIGURES = {
    1: ("curves",),
    2: ("curves", "augmentation"),
    3: ("curves", "confusion_matrix", "top_losses", "gradcam", "se_gates"),
    4: ("accuracy", "reliability"),
}
IMG_BUDGET_BYTES = 1_000_000  # all of docs/img: the repository stays small to clone
IMG_WIDTHS = (900, 720, 560)  # pixels: the widest that fits the budget is used
# Heatmaps whose colours are the numbers: a 256-colour palette would merge neighbouring cells' shades, so they
# keep full colour. The other figures (curves, photos) lose nothing visible in a palette, at a third the size.
FULL_COLOUR_FIGURES = ("confusion_matrix", "se_gates")


class FilingError(Exception):
    """A run that cannot be filed, with the reason and what to do about it."""


def record_path(kind: str, level: int, results_dir: Path = RESULTS_DIR) -> Path:
    return Path(results_dir) / kind / f"level{level}.json"


def load_records(kind: str, results_dir: Path = RESULTS_DIR) -> dict[int, dict]:
    """Every level's kept record of one kind ("cpu" or "gpu"), by level number."""
    found = {}
    for level in LEVEL_NUMBERS:
        path = record_path(kind, level, results_dir)
        if path.is_file():
            found[level] = json.loads(path.read_text())
    return found


def figure_name(level: int, key: str) -> str:
    """docs/img's file name for a level's figure: level3-confusion-matrix.png."""
    return f"level{level}-{key.replace('_', '-').replace(' ', '-')}.png"


# ----------------------------------------------------------------------------------------------------------
# Which kind of run, and may it be filed?


def record_kind(m: dict) -> str:
    """"cpu" for a CPU-profile run on a CPU, "gpu" for the original recipe (the default on a GPU, or `--profile
    gpu`) on a GPU; anything else has no column in the README's table and is refused."""
    device_type = (m.get("environment") or {}).get("device_type")
    profile = m.get("profile")
    if profile == "cpu" and device_type == "cpu":
        return "cpu"
    if profile in (None, "gpu") and device_type == "cuda":
        return "gpu"
    raise FilingError(f"a run with --profile {profile} on a {device_type or 'unknown'} device: results/ keeps "
                      f"`--profile cpu` runs on a CPU (results/cpu) and default-recipe runs on a GPU (results/gpu)")


def problems(m: dict, level: int) -> list[str]:
    """Why this run's metrics.json cannot be a kept record (empty: it can)."""
    found = []
    if m.get("level") != level:
        found.append(f"it is a record of level {m.get('level')}, not level {level}")
    status = effective_status(m)
    if status != "complete":
        found.append(f"its status is `{status}`, not `complete`: only a finished run is kept"
                     + (" (its process is gone: it was killed; continue it with --resume)"
                        if status != m.get("status") else ""))
    if m.get("quick"):
        found.append("it is a smoke run (--quick): it shows that the code works, not what the method reaches")
    partial = [f"{key.replace('_size', '')} {m.get(key)}" for key, full in FULL_SIZES.items() if m.get(key) != full]
    if partial:
        found.append(f"it did not use the whole data set ({', '.join(partial)} images; the whole is "
                     f"{', '.join(f'{v:,}' for v in FULL_SIZES.values())})")
    if m.get("test_accuracy") is None:
        found.append("it has no test accuracy")
    return found


# ----------------------------------------------------------------------------------------------------------
# The commit whose code a run ran


def _git(root: Path, *args: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(["git", "-C", str(root), *args], input=stdin, capture_output=True, check=True).stdout


def code_version_at(commit: str, root: Path = ROOT) -> str:
    """common.training.code_version() of the code as committed at `commit`: the same digest (sha256 over each
    .py file's path and bytes under common/, at any depth, and directly in levels/, in path order), read from git
    instead of the disk."""
    entries = []
    for line in _git(root, "ls-tree", "-r", commit, "--", "common/", "levels/").decode().splitlines():
        meta, path = line.split("\t", 1)
        _, kind, blob = meta.split()
        if kind == "blob" and path.endswith(".py") and (path.startswith("common/") or path.count("/") == 1):
            entries.append((path, blob))
    entries.sort()
    # every blob in one `git cat-file --batch` call: "<sha> blob <size>\n<bytes>\n" per blob
    output = _git(root, "cat-file", "--batch", stdin="".join(f"{blob}\n" for _, blob in entries).encode())
    digest, offset = hashlib.sha256(), 0
    for path, _ in entries:
        header_end = output.index(b"\n", offset)
        size = int(output[offset:header_end].split()[2])
        content = output[header_end + 1:header_end + 1 + size]
        offset = header_end + 1 + size + 1
        digest.update(path.encode() + b"\0" + content)
    return digest.hexdigest()[:16]


def find_commit(code_version: str, root: Path = ROOT, limit: int = 500) -> str | None:
    """The commit (on HEAD's history) that made common/ and levels/ exactly the code a run recorded as its
    code_version, or None: the run ran code that was never committed. Only the commits that changed that code
    need checking: every other commit has the code of the last one that did (so later commits that touched
    neither, a README edit say, ran the same code). The newest such commit when the code came back to a state. --full-history: git would otherwise
    skip a merged branch whose end result equals the other side's, and with it the code states along it."""
    commits = _git(root, "rev-list", "--full-history", f"--max-count={limit}", "HEAD", "--", "common",
                   "levels").decode().split()
    return next((commit for commit in commits if code_version_at(commit, root) == code_version), None)


# ----------------------------------------------------------------------------------------------------------
# Small PNGs for docs/img


def small_png(source: Path, width: int, palette: bool = True) -> bytes:
    """The figure as a PNG at most `width` pixels wide; with `palette`, in 256 colours (see FULL_COLOUR_FIGURES)."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        if palette:
            image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def shrink_figures(sources: dict[str, tuple[str, Path]], room: int) -> dict[str, bytes]:
    """{name: PNG bytes} for the sources ({name: (figure key, path)}), at the widest of IMG_WIDTHS whose total
    fits in `room` bytes."""
    for width in IMG_WIDTHS:
        pngs = {name: small_png(path, width, palette=key not in FULL_COLOUR_FIGURES)
                for name, (key, path) in sources.items()}
        if sum(len(png) for png in pngs.values()) <= room:
            return pngs
    raise FilingError(f"the figures take {sum(len(p) for p in pngs.values()):,} bytes at {IMG_WIDTHS[-1]} px wide, "
                      f"but docs/img has {room:,} bytes left of its {IMG_BUDGET_BYTES:,}: make room there first")


# ----------------------------------------------------------------------------------------------------------
# Filing


@dataclass
class Filed:
    record: Path
    figures: list[Path]
    commit: str
    commit_verified: bool
    notes: list[str]  # what filing added or could not add (the data's description)


def file_run(out_dir: Path, level: int, commit: str | None = None, root: Path = ROOT, repo: Path = ROOT) -> Filed:
    """File OUT_DIR/levelN/metrics.json as ROOT/results/<kind>/levelN.json, and its figures into ROOT/docs/img.

    `commit`: the run's commit when its code_version matches no commit (a run started from uncommitted code
    that was committed later with other changes); the record then says the commit was not verified. `root` is
    the tree that holds results/ and docs/ (the repository, or a test's folder); `repo` is the git repository
    whose history is searched for the run's code."""
    out_dir, root = Path(out_dir), Path(root)
    source = metrics_path(out_dir, level)
    if not source.is_file():
        raise FilingError(f"no run of level {level} in {out_dir} ({source} does not exist)")
    m = json.loads(source.read_text())
    reasons = problems(m, level)
    if reasons:
        raise FilingError(f"{source} cannot be filed: " + "; ".join(reasons) + ".")
    kind = record_kind(m)

    if commit is None:
        commit, verified = find_commit(m.get("code_version", ""), repo), True
        if commit is None:
            raise FilingError(f"the run's code (code_version {m.get('code_version')}) matches no commit on this "
                              f"branch: commit the code it ran with, then file it again; or, if that exact code "
                              f"was never committed, name the nearest commit with --commit (the record will say "
                              f"it was not verified)")
    else:
        try:
            commit = _git(repo, "rev-parse", "--verify", f"{commit}^{{commit}}").decode().strip()
        except subprocess.CalledProcessError:
            raise FilingError(f"--commit {commit}: no such commit in this repository") from None
        verified = code_version_at(commit, repo) == m.get("code_version")

    img_dir = root / IMG_DIR.relative_to(ROOT)
    prefix = f"level{level}-"
    sources = {figure_name(level, key): (key, out_dir / path) for key, path in (m.get("figures") or {}).items()
               if key in KEPT_FIGURES[level] and (out_dir / path).is_file()}
    # the room left in docs/img, not counting this level's figures: filing the level again replaces them
    others = sum(f.stat().st_size for f in img_dir.glob("*.png") if not f.name.startswith(prefix)) \
        if img_dir.is_dir() else 0
    pngs = shrink_figures(sources, IMG_BUDGET_BYTES - others)

    img_dir.mkdir(parents=True, exist_ok=True)
    for stale in img_dir.glob(f"{prefix}*.png"):  # a level filed again keeps no figure of its earlier record
        if stale.name not in pngs:
            stale.unlink()
    figures = {}
    for key in m.get("figures") or {}:
        name = figure_name(level, key)
        if name in pngs:
            (img_dir / name).write_bytes(pngs[name])
            figures[key] = (img_dir / name).relative_to(root).as_posix()  # as the README links it

    m.pop("process", None)  # the pid and host of a process long gone: meaningless in a kept record
    notes = [note for note in [describe_missing_data(m, "filing")] if note]  # a run from before `data` was kept
    m["record"] = dict(kind=kind, commit=commit, commit_verified=verified,
                       filed_from=f"{OUT}/{source.relative_to(out_dir).as_posix()}",
                       filed_on=time.strftime("%Y-%m-%d"), figures=figures)
    m = scrub_paths(m)  # DATA, OUT, WEIGHTS/...: no path of this machine in a kept record
    path = write_json_atomic(record_path(kind, level, root / RESULTS_DIR.relative_to(ROOT)), m)
    return Filed(path, [root / p for p in figures.values()], commit, verified, notes)
