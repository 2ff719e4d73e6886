"""The peers beside our results: the fastest known CIFAR-10 recipes, trained from scratch, on the same data.

results/cpu/peers.json keeps airbench94's and airbench95's numbers (PyPI airbench 0.1.8: its own train94() and
train95() and networks, unmodified) on this repository's JPEG copy, measured by a colleague, beside what airbench's
code states for the official files. It is not a run of this repository's code, and says so: PEER_RUNS below is the
colleague's report as given, with its provenance; `python run.py record --peers` writes it as the record, adding
the content fingerprint of the JPEG copy (common/data.py) where --data-dir finds it. The README's results block
reads the record (common/runner/readme.py): the peers' rows, each level's distance from the same-data rows, and
what the JPEG copy costs against the official files.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.io import write_json_atomic

PEERS_FILE = "peers.json"  # in results/cpu/
JPEG_COPY, OFFICIAL = "this JPEG copy", "the official files"
CPU = "CPU: a 2-core Intel Xeon with AMX"
COLLEAGUE = "a colleague, with the shared script (one run, seed 0)"

PROVENANCE = dict(
    what="not a run of this repository's code: a colleague's measurement of airbench on this repository's data, "
         "and airbench's own numbers for the official files",
    package="airbench 0.1.8 from PyPI: its own train94() and train95() and networks, unmodified; only the device "
            "calls moved to the CPU (CUDA events, .cuda(), half precision), with bf16 autocast",
    script="shared/peer/airbench94_on_this_data.py in the project's shared folder (AIRBENCH=95 for airbench95)",
    data="the shared JPEG copy (shared/data/cifar10-jpeg.tar.gz: a public JPEG export of CIFAR-10, quality 75), "
         "the copy the levels' records were made on",
    hardware=f"the colleague's runs: {CPU}; the official files' rows: airbench's GPU runs", seed=0,
    test_accuracy="airbench's own test-time augmentation, on the 10,000 test images",
    training_time="train_seconds, by airbench's own clock (training only): the CPU rows were reported in minutes to "
                  "one decimal (6.0 min: 360 s), the A100's in seconds",
)

# The colleague's report, as given. compare_with_levels: the rows on this copy's 40,000 training images, the size of
# the levels' training split (the levels validate on the other 10,000), against which the README sets each level.
PEER_RUNS = [
    dict(recipe="airbench94", data=JPEG_COPY, train_images=40_000,
         training_set="a seeded 40,000 of its training images",
         note="torch.randperm with seed 0 over the 50,000: the levels' training split's size, not its images",
         test_accuracy=0.8990, train_seconds=360, hardware=CPU, precision="bf16 autocast", runs=1,
         measured_by=COLLEAGUE, compare_with_levels=True),
    dict(recipe="airbench94", data=JPEG_COPY, train_images=50_000, training_set="all 50,000 training images",
         test_accuracy=0.9066, train_seconds=456, hardware=CPU, precision="bf16 autocast", runs=1,
         measured_by=COLLEAGUE, compare_with_levels=False),
    dict(recipe="airbench94", data=OFFICIAL, train_images=50_000, training_set="all 50,000 training images",
         test_accuracy=0.9401, train_seconds=3.83, hardware="GPU: an NVIDIA A100", precision="fp16", runs=1000,
         measured_by="airbench's code: the mean of 1,000 runs", compare_with_levels=False),
    dict(recipe="airbench95", variant="wider, 15 epochs", data=JPEG_COPY, train_images=40_000,
         training_set="the same seeded 40,000", test_accuracy=0.9113, train_seconds=1512, hardware=CPU,
         precision="bf16 autocast", runs=1, measured_by=COLLEAGUE, compare_with_levels=True),
    dict(recipe="airbench95", variant="wider, 15 epochs", data=OFFICIAL, train_images=50_000,
         training_set="all 50,000 training images", test_accuracy=0.9501, train_seconds=None, hardware="GPU",
         precision=None, runs=200, measured_by="airbench's code: the mean of 200 runs (no time given)",
         compare_with_levels=False),
]


def peers_path(results_dir: Path) -> Path:
    return Path(results_dir) / "cpu" / PEERS_FILE


def write_peers_record(results_dir: Path, data_dir: str | None = None) -> tuple[Path, str]:
    """results/cpu/peers.json from PEER_RUNS, with the JPEG copy described (common.data.describe_data) when
    data_dir holds it. -> (the record, what was said of the data)."""
    from common.data import DataError, load_described

    record = dict(title="The fastest known CIFAR-10 recipes, trained from scratch, on the same data",
                  provenance=PROVENANCE, runs=PEER_RUNS)
    try:
        _, _, data = load_described(data_dir, download=False)
    except DataError as problem:
        said = f"the JPEG copy not described ({str(problem).splitlines()[0]})"
    else:
        if data["files"].startswith("JPEG") and (data["train_images"], data["test_images"]) == (50_000, 10_000):
            record["data"] = dict(data, described="by `python run.py record --peers`, from the shared JPEG copy as "
                                  "extracted on the machine that wrote this record: the copy the colleague's runs read")
            said = f"the JPEG copy described (fingerprint {data['fingerprint']})"
        else:
            said = f"not described: --data-dir holds {data['files']}, not the shared JPEG copy"
    return write_json_atomic(peers_path(results_dir), record), said


def load_peers(results_dir: Path) -> dict | None:
    path = peers_path(results_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def _find(peers: dict, recipe: str, data: str, train_images: int) -> dict | None:
    return next((r for r in peers.get("runs", []) if (r["recipe"], r["data"], r["train_images"]) ==
                 (recipe, data, train_images)), None)


def compared(peers: dict | None) -> list[dict]:
    """The same-data rows each level is set against."""
    return [r for r in (peers or {}).get("runs", []) if r.get("compare_with_levels")]


def against_header(peers: dict | None) -> str:
    rows = compared(peers)
    return f"against {' / '.join(r['recipe'] for r in rows)}" if rows else "against the peers"


def against_cell(m: dict | None, peers: dict | None) -> str:
    """"+2.88 / +1.65 points": a level's test accuracy minus each same-data peer's."""
    rows = compared(peers)
    if m is None or m.get("test_accuracy") is None or not rows:
        return "—"
    return " / ".join(f"{100 * (m['test_accuracy'] - r['test_accuracy']):+.2f}" for r in rows) + " points"


def _time(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _runs_text(r: dict) -> str:
    return "one run" if r.get("runs") == 1 else f"the mean of {r['runs']:,} runs"


def _pct(r: dict) -> str:
    return f"{100 * r['test_accuracy']:.2f}%"


def jpeg_cost_sentence(peers: dict) -> str:
    """What the JPEG copy costs a from-scratch recipe, from airbench94's rows: official files against this copy."""
    official, whole, part = (_find(peers, "airbench94", OFFICIAL, 50_000),
                             _find(peers, "airbench94", JPEG_COPY, 50_000), _find(peers, "airbench94", JPEG_COPY, 40_000))
    if not (official and whole and part):
        return ""
    each = f"{_runs_text(whole)} each" if whole.get("runs") == part.get("runs") else \
        f"{_runs_text(whole)} and {_runs_text(part)}"
    return (f"On {OFFICIAL} airbench94 averages {_pct(official)} ({_runs_text(official)}); on {JPEG_COPY} it reaches "
            f"{_pct(whole)} with all {whole['train_images']:,} training images and {_pct(part)} with "
            f"{part['train_images']:,} ({each}): the copy costs a from-scratch recipe about "
            f"{100 * (official['test_accuracy'] - whole['test_accuracy']):.1f} points, and the smaller training set "
            f"about {100 * (whole['test_accuracy'] - part['test_accuracy']):.1f} more.")


def readme_peers(peers: dict | None, data_fingerprint: str | None) -> list[str]:
    """The README's line on the peers: what they are, what each reached in how long, and what the JPEG copy costs.
    The whole report (every row, its hardware and who measured it) stays in the record."""
    if peers is None:
        return [f"No peer record kept yet (results/cpu/{PEERS_FILE}: `python run.py record --peers`)."]
    same = (peers.get("data") or {}).get("fingerprint")
    images = "the same images" if same and same == data_fingerprint else "the same JPEG copy, by the colleague's account"
    rows = compared(peers)
    if not rows:
        return [f"**Peers** ([record](results/cpu/{PEERS_FILE})): {jpeg_cost_sentence(peers)}".rstrip()]
    first = rows[0]
    each = ", ".join(f"{r['recipe']} {_pct(r)} in {_time(r.get('train_seconds'))}" for r in rows)
    return [f"**Peers** ([record](results/cpu/{PEERS_FILE})): the fastest known CIFAR-10 recipes, trained from scratch "
            f"on {images} ({first['train_images']:,} training images): {each} (airbench's own code, "
            f"{first['hardware'].removeprefix('CPU: ')}, {first['precision']}, {_runs_text(first)} each, measured by a "
            f"colleague). *{against_header(peers)}* is each level's test accuracy minus theirs, in points. "
            f"{jpeg_cost_sentence(peers)}".rstrip()]
