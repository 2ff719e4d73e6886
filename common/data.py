"""CIFAR-10 from disk into memory, and the fixed splits every level uses.

Three ways in, chosen by --data-dir (or the CIFAR10_DIR environment variable, default ./data):
  1. a folder holding the official python batches, `cifar-10-batches-py/`;
  2. an image folder, `DIR/train/<class>/*.png|jpg` and `DIR/test/<class>/*.png|jpg`;
  3. neither: torchvision downloads the official batches into the folder (needs internet).

Images are kept as uint8 tensors, N x 3 x 32 x 32: the whole data set is about 180 MB that way, against
more than 700 MB as float32, and uint8 is what moves to the GPU in one copy. Decoded images are cached as
.npy files in a folder whose name carries a fingerprint of the source files, so a changed file is a new cache
entry. They are memory-mapped: a run on a subset (--quick, the tests) reads only the images it uses.

What the data is, for the record (describe_data): the layout, the file format (JPEG is lossy), the image counts and
a content fingerprint, the sha256 of the decoded images and labels. The fingerprint is the same for two copies of
the same images wherever they lie, and differs when one pixel does; it is computed once, when the cache is
written, and kept in the cache folder, so a run never reads all the images to say what they are.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLIT_SEED = 42  # fixed, so every level and every run sees the same 40,000 / 10,000 split
VAL_SIZE = 10_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

LAYOUTS_HELP = (
    "--data-dir (or CIFAR10_DIR) accepts:\n"
    "  - a folder with the official python batches: DIR/cifar-10-batches-py/\n"
    "  - an image folder: DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg,\n"
    f"    with the ten classes {', '.join(CLASSES)}\n"
    "  - an empty or missing folder, into which torchvision downloads CIFAR-10 (needs internet)"
)


class DataError(Exception):
    """Bad or missing input data. The message is meant for the user, as is."""


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x 32 x 32
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class CifarSplits:
    train: Split
    val: Split
    test: Split
    source: str  # where the images came from, for the record
    data: dict | None = None  # what the images are (describe_data): layout, file format, counts, fingerprint


# ----------------------------------------------------------------------------------------------------------
# Finding the data


def resolve_data_dir(flag: str | os.PathLike | None) -> Path:
    return Path(flag or os.environ.get("CIFAR10_DIR") or "data").expanduser()


def _find_layout(root: Path) -> tuple[str, Path] | None:
    """The layout found at root or one folder below it (an extracted archive often adds one level)."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (folder / "cifar-10-batches-py").is_dir():
            return "batches", folder / "cifar-10-batches-py"
        if folder.name == "cifar-10-batches-py":
            return "batches", folder
        if (folder / "train").is_dir() or (folder / "test").is_dir():
            return "imagefolder", folder
    return None


def _download(root: Path) -> Path:
    import torchvision

    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(root=str(root), train=train, download=True)
    except Exception as error:  # URLError, OSError, RuntimeError: all mean "could not get it"
        raise DataError(
            f"No CIFAR-10 found in '{root}' and the download failed ({type(error).__name__}: {error}).\n"
            f"If this machine is offline, point --data-dir at a copy of the data.\n{LAYOUTS_HELP}"
        ) from None
    return root / "cifar-10-batches-py"


def _fingerprint(files: list[str | Path], root: Path) -> str:
    """Changes whenever a source file is added, removed, renamed, resized or rewritten (mtime).

    Plain strings and os.stat, not pathlib: for 60,000 files pathlib's parsing and comparisons cost seconds at
    the start of every run."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    prefix = os.path.join(os.fspath(root), "")
    for f in map(os.fspath, files):
        stat = os.stat(f)
        relative = f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, root)
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------
# Reading the two layouts


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except FileNotFoundError:
        raise DataError(f"'{path}' is missing: cifar-10-batches-py/ must hold data_batch_1..5 and test_batch.\n"
                        f"{LAYOUTS_HELP}") from None
    except Exception as error:
        raise DataError(f"'{path}' is not a readable CIFAR-10 batch (truncated or corrupted?): "
                        f"{type(error).__name__}: {error}\nDelete it to download again, or point --data-dir at a "
                        f"clean copy.") from None
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"'{path}' holds images of {data.shape[1:]} values each; CIFAR-10 needs 32x32 RGB "
                        f"(3072 values).\nPoint --data-dir at the real CIFAR-10.")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _batch_files(folder: Path) -> dict[str, list[Path]]:
    return {"train": [folder / f"data_batch_{i}" for i in range(1, 6)], "test": [folder / "test_batch"]}


def _read_batches(files: dict[str, list[Path]]) -> dict[str, np.ndarray]:
    arrays = {}
    for part, paths in files.items():
        images, labels = zip(*(_read_batch(p) for p in paths))
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = np.concatenate(images), np.concatenate(labels)
    return arrays


def _imagefolder_files(folder: Path) -> dict[str, list[tuple[str, int]]]:
    files = {}
    for part in ("train", "test"):
        part_dir = folder / part
        if not part_dir.is_dir():
            raise DataError(f"'{folder}' has no '{part}/' folder.\n{LAYOUTS_HELP}")
        found = sorted(p.name for p in part_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        missing = [c for c in CLASSES if c not in found]
        extra = [c for c in found if c not in CLASSES]
        if missing or extra:
            problem = (f"missing classes: {', '.join(missing)}" if missing else "") + \
                      ("; " if missing and extra else "") + \
                      (f"unknown classes: {', '.join(extra)}" if extra else "")
            raise DataError(f"'{part_dir}' does not hold the ten CIFAR-10 classes ({problem}).\n{LAYOUTS_HELP}")
        entries = []
        for label, name in enumerate(CLASSES):
            class_dir = os.path.join(part_dir, name)  # strings, as in _fingerprint: pathlib costs seconds here
            images = sorted(entry.name for entry in os.scandir(class_dir)
                            if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"'{class_dir}' holds no .png or .jpg images.\n{LAYOUTS_HELP}")
            entries += [(os.path.join(class_dir, image), label) for image in images]
        files[part] = entries
    return files


def _decode(path: str | Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # PIL reads lazily: force the decode here, so a truncated file fails here
            size, mode = image.size, image.mode
            pixels = np.asarray(image)
    except Exception as error:
        raise DataError(f"'{path}' cannot be read as an image (truncated or corrupted?): "
                        f"{type(error).__name__}: {error}\nReplace or remove it, or point --data-dir at a clean "
                        f"copy.") from None
    if size != (32, 32) or mode != "RGB":
        raise DataError(f"'{path}' is a {size[0]}x{size[1]} {mode} image; CIFAR-10 images are 32x32 RGB.\n"
                        f"Point --data-dir at the real CIFAR-10.\n{LAYOUTS_HELP}")
    return pixels.transpose(2, 0, 1)


def _read_imagefolder(files: dict[str, list[tuple[str, int]]]) -> dict[str, np.ndarray]:
    # Plain serial decoding: 60,000 tiny JPEGs take about 8 s on one core, and threads only add GIL contention.
    arrays = {}
    for part, entries in files.items():
        arrays[f"{part}_images"] = np.stack([_decode(path) for path, _ in entries])
        arrays[f"{part}_labels"] = np.array([label for _, label in entries], dtype=np.int64)
    return arrays


# ----------------------------------------------------------------------------------------------------------
# Loading with a cache

CACHED_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
FINGERPRINT_FILE = "content-fingerprint.txt"  # in the cache folder: content_fingerprint() of its arrays
LAYOUT_WORDS = {"batches": "official python batches", "imagefolder": "image folder"}
FILE_WORDS = {".jpg": "JPEG (lossy)", ".jpeg": "JPEG (lossy)", ".png": "PNG (lossless)"}


def cache_dir() -> Path:
    return Path(os.environ.get("CIFAR10_CACHE") or Path.home() / ".cache" / "cifar10-levels")


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> tuple[dict[str, np.ndarray], str]:
    """All 60,000 images as uint8 arrays: {train,test}_{images,labels}, and a line saying where they came from."""
    arrays, source, _ = load_described(data_dir, download)
    return arrays, source


def load_described(data_dir: str | os.PathLike | None = None, download: bool = True
                   ) -> tuple[dict[str, np.ndarray], str, dict]:
    """load_cifar10's arrays and line, and what the data is (describe_data)."""
    root = resolve_data_dir(data_dir)
    layout = _find_layout(root) if root.is_dir() else None
    if layout is None:
        if root.exists() and not root.is_dir():
            raise DataError(f"--data-dir '{root}' is a file, not a folder.\n{LAYOUTS_HELP}")
        if root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise DataError(f"'{root}' holds neither cifar-10-batches-py/ nor train/ and test/ folders.\n"
                            f"{LAYOUTS_HELP}")
        if not download:
            raise DataError(f"No CIFAR-10 found in '{root}'.\n{LAYOUTS_HELP}")
        layout = ("batches", _download(root))
    kind, folder = layout

    if kind == "batches":
        batch_files = _batch_files(folder)
        source_files = [p for paths in batch_files.values() for p in paths]
        for p in source_files:
            if not p.is_file():
                raise DataError(f"'{p}' is missing: cifar-10-batches-py/ must hold data_batch_1..5 and "
                                f"test_batch.\n{LAYOUTS_HELP}")
    else:
        image_files = _imagefolder_files(folder)
        source_files = [p for entries in image_files.values() for p, _ in entries]
    suffixes = set() if kind == "batches" else {os.path.splitext(p)[1].lower() for p in source_files}

    key = _fingerprint(source_files, folder)
    cache = cache_dir() / f"cifar10-{kind}-{key}"
    source = f"{kind} at {folder}"
    try:
        # memory-mapped, read-only: make_splits copies out the images a run uses (reading all 184 MB from an
        # .npz took 1.3 s on the 2-core EPYC; a --quick run's few thousand images now take milliseconds)
        arrays = {name: np.load(cache / f"{name}.npy", mmap_mode="r") for name in CACHED_ARRAYS}
        return arrays, source, describe_data(kind, suffixes, arrays, _cached_fingerprint(cache, arrays))
    except (OSError, ValueError):  # not cached yet, or a cache file damaged: decode (again), and cache anew
        shutil.rmtree(cache, ignore_errors=True)

    arrays = _read_batches(batch_files) if kind == "batches" else _read_imagefolder(image_files)
    fingerprint = content_fingerprint(arrays)
    _write_cache(cache, arrays, fingerprint)
    return arrays, source, describe_data(kind, suffixes, arrays, fingerprint)


def content_fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """The first 16 hex digits of the sha256 of the decoded images (uint8) and labels (int64), each array with its
    shape, in the loader's order: where the files lie and how they are named does not enter it, every pixel does."""
    digest = hashlib.sha256()
    for name in CACHED_ARRAYS:
        array = np.ascontiguousarray(arrays[name], dtype=np.uint8 if name.endswith("images") else np.int64)
        digest.update(f"{name} {array.shape}\n".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def _cached_fingerprint(cache: Path, arrays: dict[str, np.ndarray]) -> str:
    """The fingerprint kept in the cache folder; a cache written before fingerprints were kept gets it now, once."""
    try:
        kept = (cache / FINGERPRINT_FILE).read_text().strip()
        if len(kept) == 16:
            return kept
    except OSError:
        pass
    fingerprint = content_fingerprint(arrays)
    partial = cache / f".{FINGERPRINT_FILE}.{os.getpid()}.partial"
    try:
        partial.write_text(fingerprint + "\n")
        os.replace(partial, cache / FINGERPRINT_FILE)
    except OSError:  # a read-only cache: the next run computes it again
        partial.unlink(missing_ok=True)
    return fingerprint


def describe_data(kind: str, suffixes: set[str], arrays: dict[str, np.ndarray], fingerprint: str) -> dict:
    """What the data is, in a record: its layout, its files (JPEG is lossy), its image counts, its content."""
    files = "pickled arrays (lossless)" if kind == "batches" else \
        " and ".join(sorted({FILE_WORDS.get(s, s) for s in suffixes}))
    return dict(layout=LAYOUT_WORDS[kind], files=files, train_images=len(arrays["train_labels"]),
                test_images=len(arrays["test_labels"]), fingerprint=fingerprint)


def _write_cache(folder: Path, arrays: dict[str, np.ndarray], fingerprint: str) -> None:
    partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        for name in CACHED_ARRAYS:
            np.save(partial / f"{name}.npy", arrays[name])
        (partial / FINGERPRINT_FILE).write_text(fingerprint + "\n")
        os.rename(partial, folder)  # atomic: a crash never leaves a half-written cache behind
        folder.with_name(folder.name + ".npz").unlink(missing_ok=True)  # the same images as cached before (one .npz)
    except OSError:
        pass  # a read-only home folder only costs the next run a re-decode; another process may have won the race
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Splits


def stratified_subset(labels: np.ndarray, size: int | None, seed: int = SPLIT_SEED) -> np.ndarray:
    """Indices of a class-balanced random subset of `size` items (all of them, in order, when size is None)."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    if size is None or size >= len(labels):
        return everything
    if size < len(CLASSES):
        raise DataError(f"A subset of {size} images cannot hold all ten classes; ask for at least {len(CLASSES)}.")
    subset, _ = train_test_split(everything, train_size=size, stratify=labels, random_state=seed)
    return np.sort(subset)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/validation split of the official training set: sorted indices, stratified, seed 42."""
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=VAL_SIZE, stratify=labels,
                                          random_state=SPLIT_SEED)
    return np.sort(train_idx), np.sort(val_idx)


def make_splits(arrays: dict[str, np.ndarray], source: str = "", train_size: int | None = None,
                val_size: int | None = None, test_size: int | None = None, data: dict | None = None) -> CifarSplits:
    """40,000 train / 10,000 validation drawn stratified from the official training set, plus the official test set.

    The sizes shrink those splits to stratified subsets (the --train-size flag, and the --quick profile).
    """
    labels = arrays["train_labels"]
    train_idx, val_idx = split_indices(labels)
    train_idx = train_idx[stratified_subset(labels[train_idx], train_size)]
    val_idx = val_idx[stratified_subset(labels[val_idx], val_size)]
    test_idx = stratified_subset(arrays["test_labels"], test_size)

    def split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx]))

    return CifarSplits(
        train=split(arrays["train_images"], arrays["train_labels"], train_idx),
        val=split(arrays["train_images"], arrays["train_labels"], val_idx),
        test=split(arrays["test_images"], arrays["test_labels"], test_idx),
        source=source,
        data=data,
    )


def load_splits(data_dir=None, train_size=None, val_size=None, test_size=None) -> CifarSplits:
    arrays, source, data = load_described(data_dir)
    return make_splits(arrays, source, train_size, val_size, test_size, data)
