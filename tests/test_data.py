"""Data loading, splits, cache and bad-input messages, on the real CIFAR-10 JPEG files."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import data
from common.data import CLASSES, DataError, load_cifar10, load_described, make_splits
from conftest import run_cli


@pytest.fixture(scope="module")
def full(cifar_dir):
    arrays, source = load_cifar10(cifar_dir)
    return arrays


def small_imagefolder(cifar_dir: Path, target: Path, per_class: int = 3) -> Path:
    """A copy of a few real images per class, in the image-folder layout."""
    for part in ("train", "test"):
        for name in CLASSES:
            (target / part / name).mkdir(parents=True)
            for src in sorted((cifar_dir / part / name).iterdir())[:per_class]:
                shutil.copy(src, target / part / name / src.name)
    return target


def test_imagefolder_loads_all_of_cifar10(full):
    assert full["train_images"].shape == (50_000, 3, 32, 32) and full["train_images"].dtype == np.uint8
    assert full["test_images"].shape == (10_000, 3, 32, 32)
    assert np.bincount(full["train_labels"]).tolist() == [5000] * 10
    assert np.bincount(full["test_labels"]).tolist() == [1000] * 10
    # real photographs, not blank arrays: pixels span the range and images differ
    assert full["train_images"].std() > 40 and not np.array_equal(full["train_images"][0], full["train_images"][1])


def test_splits_are_stratified_disjoint_and_fixed(full):
    splits = make_splits(full)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40_000, 10_000, 10_000)
    assert np.bincount(splits.train.labels.numpy()).tolist() == [4000] * 10
    assert np.bincount(splits.val.labels.numpy()).tolist() == [1000] * 10
    # disjoint: no validation image is also a training image
    train_rows = {bytes(x) for x in splits.train.images.numpy().reshape(40_000, -1)[:, :64]}
    val_rows = [bytes(x) for x in splits.val.images.numpy().reshape(10_000, -1)[:, :64]]
    assert sum(r in train_rows for r in val_rows) < 20  # a few CIFAR images are near-duplicates of each other
    again = make_splits(full)
    assert np.array_equal(again.val.images.numpy(), splits.val.images.numpy())


# sha256 of the validation indices (int64) of the seed-42 split of the shared JPEG copy's 50,000 training images,
# in the image folder's order. If this changes, every level's validation set changed: results are not comparable.
PINNED_VALIDATION_INDICES = "15574faef132486a04353f93f057006979096d58769056dccb69d063819a2bc6"


def test_the_split_is_pinned(full):
    import hashlib

    from common.data import split_indices

    train_idx, val_idx = split_indices(full["train_labels"])
    assert hashlib.sha256(val_idx.astype(np.int64).tobytes()).hexdigest() == PINNED_VALIDATION_INDICES
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 50_000


def test_subsets_are_stratified_subsets_of_the_splits(full):
    whole, small = make_splits(full), make_splits(full, train_size=2000, val_size=500, test_size=1000)
    assert (len(small.train), len(small.val), len(small.test)) == (2000, 500, 1000)
    assert np.bincount(small.train.labels.numpy()).tolist() == [200] * 10
    val_rows = {bytes(x) for x in whole.val.images.numpy().reshape(10_000, -1)}
    assert all(bytes(x) in val_rows for x in small.val.images.numpy().reshape(500, -1))


def test_official_batches_loader(full, tmp_path):
    """The official python-pickle format, written here from real images, loads back to exactly the same arrays."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name, source in [*[(f"data_batch_{i}", "train") for i in range(1, 6)], ("test_batch", "test")]:
        idx = rng.choice(len(full[f"{source}_labels"]), 40, replace=False)
        images, labels = full[f"{source}_images"][idx], full[f"{source}_labels"][idx]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images.reshape(40, -1), b"labels": labels.tolist()}, f)
        written[name] = (images, labels)
    arrays, source = load_cifar10(tmp_path)
    assert source.startswith("batches")
    _, _, described = load_described(tmp_path)
    assert {k: v for k, v in described.items() if k != "fingerprint"} == dict(
        layout="official python batches", files="pickled arrays (lossless)", train_images=200, test_images=40)
    assert np.array_equal(arrays["train_images"], np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]))
    assert np.array_equal(arrays["test_labels"], written["test_batch"][1])


def test_cache_is_used_and_never_outlives_a_change(cifar_dir, tmp_path, monkeypatch):
    folder = small_imagefolder(cifar_dir, tmp_path / "small")
    first, _ = load_cifar10(folder)
    calls = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda p: calls.append(p) or real_decode(p))
    second, _ = load_cifar10(folder)
    assert calls == [] and np.array_equal(first["train_images"], second["train_images"])  # from the cache

    changed = folder / "train" / "cat" / sorted(p.name for p in (folder / "train" / "cat").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed, format="JPEG")
    third, _ = load_cifar10(folder)
    assert calls, "a changed source file must be decoded again"
    cat = CLASSES.index("cat")
    first_cat = np.flatnonzero(third["train_labels"] == cat)[0]
    assert third["train_images"][first_cat].mean(axis=(1, 2))[0] > 200  # the new red image, not the cached cat


def test_the_cache_is_memory_mapped_and_a_damaged_one_is_decoded_again(cifar_dir, tmp_path, monkeypatch):
    """The cached arrays come back memory-mapped (a run on a subset reads only its images), and an earlier version's
    .npz of the same images is removed; a cache file cut short (a full disk, a killed copy) is not an error: the
    images are decoded again, the same, and cached anew."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    folder = small_imagefolder(cifar_dir, tmp_path / "small")
    decoded, _ = load_cifar10(folder)
    [entry] = (tmp_path / "cache").iterdir()  # one folder, no partial one left behind
    old_format = entry.with_name(entry.name + ".npz")  # how an earlier version cached the same images: replaced
    old_format.write_bytes(b"an earlier version's cache")
    shutil.rmtree(entry)
    assert np.array_equal(load_cifar10(folder)[0]["train_images"], decoded["train_images"])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]
    cached, _ = load_cifar10(folder)
    assert isinstance(cached["train_images"], np.memmap) and not cached["train_images"].flags.writeable
    assert all(np.array_equal(decoded[k], cached[k]) for k in decoded)
    images = entry / "train_images.npy"
    images.write_bytes(images.read_bytes()[:-100])
    again, _ = load_cifar10(folder)
    assert all(np.array_equal(decoded[k], again[k]) for k in decoded)
    mended, _ = load_cifar10(folder)  # and cached anew
    assert isinstance(mended["train_images"], np.memmap) and np.array_equal(decoded["train_images"],
                                                                            mended["train_images"])


def test_the_data_is_described_by_its_content_not_by_its_folder(cifar_dir, tmp_path):
    """The description a record keeps: the layout, the file format, the counts, and a fingerprint of the decoded
    images and labels. Two copies of the same images in different folders share it; the same pixels saved as
    PNG keep it (the format changes, the content does not); one changed image changes it."""
    first = small_imagefolder(cifar_dir, tmp_path / "one")
    second = small_imagefolder(cifar_dir, tmp_path / "elsewhere" / "two")
    arrays, _, one = load_described(first)
    assert one == dict(layout="image folder", files="JPEG (lossy)", train_images=30, test_images=30,
                       fingerprint=one["fingerprint"]) and len(one["fingerprint"]) == 16
    assert load_described(second)[2] == one

    as_png = tmp_path / "png"
    for jpeg in first.rglob("*.jpg"):
        target = (as_png / jpeg.relative_to(first)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(jpeg) as image:
            image.save(target)
    png = load_described(as_png)[2]
    assert png["files"] == "PNG (lossless)" and png["fingerprint"] == one["fingerprint"]

    victim = sorted((second / "test" / "ship").iterdir())[0]
    with Image.open(victim) as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(victim, format="PNG")  # one pixel, losslessly, under its .jpg name
    changed = load_described(second)[2]
    assert changed["fingerprint"] != one["fingerprint"] and changed["train_images"] == 30


def test_the_splits_carry_the_description_a_run_records(full, cifar_dir):
    splits = data.load_splits(cifar_dir, train_size=100, val_size=100, test_size=100)
    assert splits.data == load_described(cifar_dir)[2]
    assert splits.data["files"] == "JPEG (lossy)" and (splits.data["train_images"], splits.data["test_images"]) == (
        50_000, 10_000)


def test_the_fingerprint_is_computed_once_and_kept_in_the_cache(cifar_dir, tmp_path, monkeypatch):
    """A run reads the fingerprint from the cache folder, not from all the images; a cache written before
    fingerprints were kept gets it on its first read, once, and a subset still comes from the memory map."""
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path / "cache"))
    folder = small_imagefolder(cifar_dir, tmp_path / "small")
    computed = []
    real = data.content_fingerprint
    monkeypatch.setattr(data, "content_fingerprint", lambda arrays: computed.append(1) or real(arrays))
    fingerprint = load_described(folder)[2]["fingerprint"]
    [entry] = (tmp_path / "cache").iterdir()
    assert computed == [1] and (entry / data.FINGERPRINT_FILE).read_text().strip() == fingerprint

    arrays, _, again = load_described(folder)
    assert computed == [1] and again["fingerprint"] == fingerprint and isinstance(arrays["train_images"], np.memmap)
    (entry / data.FINGERPRINT_FILE).unlink()  # as an older version left its cache
    assert load_described(folder)[2]["fingerprint"] == fingerprint and computed == [1, 1]
    assert load_described(folder)[2]["fingerprint"] == fingerprint and computed == [1, 1]
    assert real({k: np.asarray(v) for k, v in load_cifar10(folder)[0].items()}) == fingerprint


@pytest.mark.parametrize("problem", ["missing_class", "truncated", "wrong_size", "grayscale", "wrong_layout"])
def test_bad_image_folders_give_a_clear_error(cifar_dir, tmp_path, problem):
    folder = small_imagefolder(cifar_dir, tmp_path / "bad")
    first = lambda d: sorted(d.iterdir())[0]  # noqa: E731
    if problem == "missing_class":
        shutil.rmtree(folder / "test" / "frog")
        expected = "missing classes: frog"
    elif problem == "truncated":
        victim = first(folder / "train" / "dog")
        victim.write_bytes(victim.read_bytes()[:200])
        expected = "truncated or corrupted"
    elif problem == "wrong_size":
        Image.new("RGB", (64, 64)).save(first(folder / "train" / "ship"), format="JPEG")
        expected = "64x64 RGB image"
    elif problem == "grayscale":
        Image.new("L", (32, 32)).save(first(folder / "test" / "bird"), format="JPEG")
        expected = "32x32 L image"
    else:
        shutil.rmtree(folder / "train")
        shutil.rmtree(folder / "test")
        (folder / "notes.txt").write_text("not CIFAR")
        expected = "neither cifar-10-batches-py/ nor train/ and test/"
    with pytest.raises(DataError, match=expected.replace("/", ".").replace("(", ".")) as error:
        load_cifar10(folder)
    assert "--data-dir" in str(error.value)


def test_bad_input_through_the_script_is_a_message_not_a_traceback(tmp_path):
    """As a user sees it: a folder with no CIFAR-10 while offline, then a corrupt official batch."""
    missing = tmp_path / "nowhere"
    result = run_cli("levels/level1_baseline.py", "--quick", "--data-dir", str(missing), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "download failed" in result.stdout and "--data-dir" in result.stdout and "cifar-10-batches-py" in result.stdout

    batches = tmp_path / "corrupt" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / name).write_bytes(b"\x80\x04 not a pickle")
    result = run_cli("run.py", "level", "1", "--quick", "--data-dir", str(tmp_path / "corrupt"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "not a readable CIFAR-10 batch" in result.stdout
