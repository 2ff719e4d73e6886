"""The README stays short and true: at most 200 lines, the set-up commands first, every link and image
resolving, and its results table and pictures exactly what the kept records in results/ give
(`python run.py summary --readme`). Also: `python run.py record` files only finished full-data runs, with no local
path in them; no kept record and no README line names a folder of the machine that made it; the peers beside the
results table are the peers' record.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from common.runner.filing import (
    FULL_SIZES, IMG_WIDTHS, KEPT_FIGURES, FilingError, code_version_at, figure_name, file_run, load_records, problems,
    record_kind,
)
from common.runner.peers import PEER_RUNS, PROVENANCE, against_cell, compared, jpeg_cost_sentence, load_peers
from common.runner.placeholders import convert_kept, describe_missing_data, local_paths, scrub_paths
from common.runner.readme import PICTURES, TEACHES, _model_text, readme_pictures, render_readme

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
HTML_IMAGE = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")


def links(text: str) -> list[tuple[bool, str]]:
    """(is an image, target) for every markdown link and image outside code, and every <img>."""
    prose = INLINE_CODE.sub("", FENCED_CODE.sub("", text))
    return [(bang == "!", target) for bang, target in LINK.findall(prose)] + \
        [(True, target) for target in HTML_IMAGE.findall(prose)]


def anchors(markdown_file: Path) -> set[str]:
    """GitHub's anchors for a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCED_CODE.sub("", markdown_file.read_text())
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def readme_images(text: str) -> list[str]:
    return [target for is_image, target in links(text) if is_image]


# ----------------------------------------------------------------------------------------------------------
# The README as it is committed


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_the_setup_commands_and_the_test_command_come_first():
    first = "\n".join(README.read_text().splitlines()[:40])
    for command in ("pip install -r requirements.txt", "python run.py level 1", "python -m pytest -q"):
        assert command in first, f"`{command}` is not in the README's first 40 lines"
    # CI runs the README's test command: .ci/run must run exactly it
    ci_command = re.search(r"python[0-9.]* -m pytest[^`\n]*", (ROOT / ".ci" / "run").read_text()).group(0).strip()
    assert ci_command == "python -m pytest -q"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page: Path):
    broken = []
    for _, target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ... : not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.name}: " + ", ".join(broken)


def test_the_readme_shows_the_recorded_pictures():
    """Every image the README shows exists; and it shows at least four once the records hold that many
    pictures (common/runner/readme.py's PICTURES): with fewer filed so far, as many as there are."""
    images = readme_images(README.read_text())
    assert all((ROOT / image).is_file() for image in images), images
    cpu = load_records("cpu")
    available = len([line for line in readme_pictures(cpu) if line.startswith("![")])
    assert len(images) >= min(4, available)


def test_the_readme_table_and_pictures_are_what_the_records_give():
    """A number typed by hand, or a table left stale after a record was filed, fails here:
    run `python run.py summary --readme`."""
    text = README.read_text()
    assert render_readme(text) == text, "README.md is stale against results/: run python run.py summary --readme"


def test_the_summary_readme_check_command_agrees():
    result = run_cli("run.py", "summary", "--readme", "--check", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


# ----------------------------------------------------------------------------------------------------------
# The generated blocks, from records made up for the purpose (structure only: nothing here is committed)


def fake_record(level: int, accuracy: float, figures: dict[str, str]) -> dict:
    return dict(level=level, status="complete", quick=False, profile="cpu", test_accuracy=accuracy,
                val_accuracy=accuracy, **FULL_SIZES, train_seconds=600.0, total_seconds=660.0, config=dict(model="m", img_size=128),
                environment=dict(device="CPU (x86_64, 2 threads)", device_type="cpu"),
                record=dict(figures=figures))


def test_a_recorded_level_shows_its_numbers_and_the_others_say_not_yet_recorded(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "level2.json").write_text(json.dumps(fake_record(2, 0.9043, {})))
    text = render_readme(README.read_text(), tmp_path)
    table = text[text.index("<!-- results:start"):text.index("<!-- results:end -->")]
    rows = {int(found.group(1)): line for line in table.splitlines()
            if (found := re.match(r"\| \[([1-4])\]\(levels/level\1_\w+\.py\) \|", line))}
    assert sorted(rows) == [1, 2, 3, 4]  # each level's number links to its script
    assert "**90.43%** ± 0.29 ([record](results/cpu/level2.json))" in rows[2]
    assert "≥ 90%: met" in rows[2] and "10.0 min training, 11.0 min in all" in rows[2] and "CPU (x86_64, 2 threads)" in rows[2]
    for level in (1, 3, 4):
        assert "not yet recorded" in rows[level] and TEACHES[level] in rows[level]
    assert all("unmeasured" in row for row in rows.values())  # no GPU record
    assert "--compile" not in rows[2]  # the record holds no `compile`: an eager run
    compiled = fake_record(2, 0.9043, {}) | dict(compile=dict(used=True, reason="--compile"))
    (tmp_path / "cpu" / "level2.json").write_text(json.dumps(compiled))
    row = next(line for line in render_readme(README.read_text(), tmp_path).splitlines() if line.startswith("| [2]"))
    assert "11.0 min in all, trained with `--compile`" in row

    (tmp_path / "gpu").mkdir()
    gpu_run = fake_record(1, 0.8812, {}) | dict(profile=None, environment=dict(device="NVIDIA T4", device_type="cuda"))
    (tmp_path / "gpu" / "level1.json").write_text(json.dumps(gpu_run))
    text = render_readme(README.read_text(), tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| [1]"))
    assert "not yet recorded" in row and "**88.12%** ± 0.32 ([record](results/gpu/level1.json))" in row
    assert "on NVIDIA T4" in row and "unmeasured" not in row


def test_level_4s_model_cell_names_each_members_size_when_they_differ():
    m = fake_record(4, 0.9, {})
    m["members"] = {"cifarnet": dict(img_size=32), "efficientnet_lite1": dict(img_size=128)}
    assert _model_text(m) == "cifarnet at 32 px, efficientnet_lite1 at 128 px"
    m["members"] = {"efficientnet_lite0+se": dict(img_size=128), "efficientnet_lite1": dict(img_size=128)}
    assert _model_text(m) == "efficientnet_lite0+se, efficientnet_lite1 at 128 px"


def test_the_readme_stays_within_200_lines_with_every_picture_filed(tmp_path):
    (tmp_path / "cpu").mkdir()
    for level, keys in KEPT_FIGURES.items():
        figures = {key: f"docs/img/{figure_name(level, key)}" for key in keys}
        (tmp_path / "cpu" / f"level{level}.json").write_text(json.dumps(fake_record(level, 0.9, figures)))
    text = render_readme(README.read_text(), tmp_path)
    assert len(text.splitlines()) <= 200
    shown = readme_images(text)
    assert len(shown) >= 4 and len(shown) == len(PICTURES) - 2  # one set of learning curves, not three
    assert {p.key for p in PICTURES} <= {key for keys in KEPT_FIGURES.values() for key in keys}


# ----------------------------------------------------------------------------------------------------------
# Filing a run: python run.py record


@pytest.fixture(scope="module")
def quick_run(cifar_dir, tmp_path_factory) -> Path:
    """A real Level 1 smoke run, tiny: the output folder it wrote."""
    out = tmp_path_factory.mktemp("quick-run")
    result = run_cli("run.py", "level", "1", "--quick", "--no-pretrained", "--train-size", "200", "--val-size", "100",
                     "--test-size", "100", "--img-size", "32", "--epochs", "1", "--data-dir", str(cifar_dir),
                     "--out-dir", str(out), timeout=900)  # seconds of work, but a busy machine can starve it
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def results_listing() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for folder in ("results", "docs/img")
                  for p in (ROOT / folder).rglob("*") if p.is_file())


def test_record_refuses_a_smoke_run_and_files_nothing(quick_run):
    before = results_listing()
    result = run_cli("run.py", "record", "--level", "1", "--from", str(quick_run), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "smoke run" in result.stdout and "whole data set" in result.stdout
    assert results_listing() == before


def as_full_run(quick_run: Path, target: Path, **changes) -> Path:
    """A copy of the smoke run's output folder whose metrics.json says it was a complete full-data CPU-profile
    run: this checks the filing logic, not a result."""
    shutil.copytree(quick_run, target)
    path = target / "level1" / "metrics.json"
    m = json.loads(path.read_text())
    m.update(dict(quick=False, profile="cpu", status="complete", **FULL_SIZES), **changes)
    path.write_text(json.dumps(m))
    return target


def test_record_files_a_complete_full_run_with_its_commit_and_small_figures(quick_run, tmp_path):
    head_code = code_version_at("HEAD")
    out = as_full_run(quick_run, tmp_path / "out", code_version=head_code)
    site = tmp_path / "site"  # stands for the repository: results/ and docs/img/ go here
    filed = file_run(out, 1, root=site)

    record = json.loads((site / "results" / "cpu" / "level1.json").read_text())
    source = json.loads((out / "level1" / "metrics.json").read_text())
    assert record["test_accuracy"] == source["test_accuracy"]
    assert record["environment"] == source["environment"]  # the hardware as the run recorded it
    assert record["record"]["commit_verified"] is True and code_version_at(record["record"]["commit"]) == head_code
    assert record["record"]["figures"] == {"curves": "docs/img/level1-curves.png"}
    from PIL import Image

    with Image.open(site / "docs" / "img" / "level1-curves.png") as image:
        assert image.format == "PNG" and image.width <= IMG_WIDTHS[0]
    assert filed.figures == [site / "docs" / "img" / "level1-curves.png"]

    # no path of this machine: the run's data and output folders (temporary folders here) are placeholders, and
    # what the data is stays described
    kept = (site / "results" / "cpu" / "level1.json").read_text()
    assert local_paths(kept) == [] and str(tmp_path) not in kept and str(quick_run) not in kept
    assert "--data-dir DATA" in record["command"] and "--out-dir OUT" in record["command"]
    assert local_paths(source["command"])  # the run's own metrics.json keeps its paths: only the record drops them
    assert (record["config"]["data_dir"], record["config"]["out_dir"]) == ("DATA", "OUT")
    assert record["data_source"] == "imagefolder at DATA"
    assert record["record"]["filed_from"] == "OUT/level1/metrics.json"
    assert record["data"] == source["data"] and record["data"]["files"] == "JPEG (lossy)"
    assert (record["data"]["train_images"], record["data"]["test_images"]) == (50_000, 10_000)
    assert filed.notes == [] and set(record["placeholders"]) == {"DATA", "OUT"}

    # the README made from that record shows its number and its picture
    text = render_readme(README.read_text(), site / "results")
    assert f"{100 * source['test_accuracy']:.2f}%" in text
    assert "![Level 1's learning curves](docs/img/level1-curves.png)" in text


def test_filing_a_run_made_before_runs_described_their_data_describes_its_folder(quick_run, tmp_path):
    """A run without `data` gets it at filing from the folder its data_source names, here, when that folder holds
    the record's image counts; the record says the description was added at filing."""
    out = as_full_run(quick_run, tmp_path / "out", code_version=code_version_at("HEAD"))
    path = out / "level1" / "metrics.json"
    m = json.loads(path.read_text())
    described = m.pop("data")
    path.write_text(json.dumps(m))
    filed = file_run(out, 1, root=tmp_path / "site")
    record = json.loads(filed.record.read_text())
    assert {k: v for k, v in record["data"].items() if k != "described"} == described
    assert record["data"]["described"].startswith("added at filing") and "data described" in filed.notes[0]
    assert local_paths(filed.record.read_text()) == []


def test_record_needs_the_commit_of_the_runs_code(quick_run, tmp_path):
    out = as_full_run(quick_run, tmp_path / "out", code_version="0" * 16)
    with pytest.raises(FilingError, match="matches no commit"):
        file_run(out, 1, root=tmp_path / "site")
    filed = file_run(out, 1, commit="HEAD", root=tmp_path / "site")  # named by hand: said to be unverified
    assert filed.commit_verified is False


def test_what_is_refused():
    full = dict(level=3, status="complete", quick=False, test_accuracy=0.9, **FULL_SIZES)
    assert problems(full, 3) == []
    assert "not `complete`" in problems({**full, "status": "interrupted"}, 3)[0]
    assert "whole data set" in problems({**full, "train_size": 20_000}, 3)[0]
    assert "level 3, not level 2" in problems(full, 2)[0]
    assert record_kind(dict(profile="cpu", environment=dict(device_type="cpu"))) == "cpu"
    assert record_kind(dict(profile=None, environment=dict(device_type="cuda"))) == "gpu"
    with pytest.raises(FilingError):
        record_kind(dict(profile=None, environment=dict(device_type="cpu")))  # the GPU recipe on a CPU: no column


def test_code_version_at_a_commit_is_code_version_of_its_files(tmp_path):
    """The record's commit is found by recomputing common.training.code_version() from git: the two agree."""
    from common.training import code_version

    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "common", "levels"], capture_output=True,
                             check=True).stdout
    (tmp_path / "head.tar").write_bytes(archive)
    with tarfile.open(tmp_path / "head.tar") as files:
        files.extractall(tmp_path / "head", filter="data")
    assert code_version_at("HEAD") == code_version(tmp_path / "head")


# ----------------------------------------------------------------------------------------------------------
# No local paths: placeholders, and the conversion of the kept records


def test_the_local_path_pattern_finds_a_machines_paths_and_nothing_else():
    for path in ("/tmp/cifar-data/cifar10-jpeg", "/root/runs/l1d", "/home/me/w.pth", "/work/shared/weights/x.pth",
                 "C:\\Users\\me\\cifar", "~/data/cifar"):
        assert local_paths(f"run.py level 1 --data-dir {path}; see `{path}`.") == [path] * 2, path
    for text in ("results/cpu/level1.json", "https://github.com/KellerJordan/airbench", "OUT/level1/metrics.json",
                 "../shared/peer/airbench94_on_this_data.py", "DATA/cifar10-jpeg", "images/s", "40,000 / 10,000",
                 "train/val", "WEIGHTS/efficientnet_lite0_imagenet.pth", "<!-- results:end -->",
                 "results/*/bench/*.json"):
        assert local_paths(text) == [], text


def test_no_kept_record_and_no_readme_line_holds_a_local_path():
    records = sorted((ROOT / "results").rglob("*.json"))
    assert len(records) >= 10  # the levels, the peers, the benchmarks, the real-epoch runs, the comparison
    found = {path.relative_to(ROOT).as_posix(): local_paths(path.read_text()) for path in records}
    assert {name: paths for name, paths in found.items() if paths} == {}
    lines = {number: line for number, line in enumerate(README.read_text().splitlines(), 1) if local_paths(line)}
    assert lines == {}
    # the speed section quotes the benchmark's command with placeholders
    assert "`python run.py bench --profile cpu --quick --data-dir DATA --out-dir OUT`" in README.read_text()


def test_the_kept_records_are_converted_and_converting_again_changes_nothing(tmp_path):
    """`python run.py record --convert-kept` was run: on a copy of results/ it changes no byte. Each level's record
    says what its data is, and that the description was added at conversion."""
    shutil.copytree(ROOT / "results", tmp_path / "results")
    convert_kept(tmp_path / "results")
    for path in sorted((ROOT / "results").rglob("*.json")):
        assert (tmp_path / path.relative_to(ROOT)).read_bytes() == path.read_bytes(), path
    levels = load_records("cpu")
    assert sorted(levels) == [1, 2, 3, 4]
    for m in levels.values():
        assert m["data"]["files"] == "JPEG (lossy)" and len(m["data"]["fingerprint"]) == 16
        assert m["data"]["described"].startswith("added at conversion")
        assert " --data-dir DATA " in m["command"] and " --out-dir OUT" in m["command"] and "WEIGHTS/" in m["command"]
        assert m["data_source"] == "imagefolder at DATA" and m["config"]["data_dir"] == "DATA"
    assert len({m["data"]["fingerprint"] for m in levels.values()}) == 1


def test_placeholders_for_every_way_a_path_enters_a_record():
    m = dict(level=4, command="/home/me/cifar/run.py level 4 --data-dir /data/sets/cifar --weights "
             "a=/w/x/a.pth,b=/w/y/b.pth --out-dir=runs/four --resume",
             config=dict(data_dir="/data/sets/cifar", out_dir="runs/four", weights="a=/w/x/a.pth,b=/w/y/b.pth"),
             data_source="imagefolder at /data/sets/cifar/cifar10-jpeg", members={"a": dict(init="/w/x/a.pth")},
             text="Level 3 has no completed run in `/home/me/cifar/runs/four`; see /opt/tools/log.txt.")
    scrubbed = scrub_paths(m)
    assert scrubbed["command"] == ("run.py level 4 --data-dir DATA --weights a=WEIGHTS/a.pth,b=WEIGHTS/b.pth "
                                   "--out-dir=OUT --resume")
    assert scrubbed["config"] == dict(data_dir="DATA", out_dir="OUT", weights="a=WEIGHTS/a.pth,b=WEIGHTS/b.pth")
    assert scrubbed["data_source"] == "imagefolder at DATA/cifar10-jpeg" and scrubbed["members"]["a"]["init"] == \
        "WEIGHTS/a.pth"
    assert scrubbed["text"] == "Level 3 has no completed run in `LOCAL/four`; see LOCAL/log.txt."
    assert set(scrubbed["placeholders"]) == {"DATA", "OUT", "WEIGHTS", "LOCAL"}
    assert scrub_paths(scrubbed) == scrubbed and local_paths(json.dumps(scrubbed)) == []
    # the data folder from CIFAR10_DIR: no --data-dir, only the data_source names it
    from_environment = scrub_paths(dict(command="run.py level 1", config=dict(data_dir=None),
                                        data_source="imagefolder at /srv/c10/jpeg"))
    assert from_environment["data_source"] == "imagefolder at DATA" and from_environment["config"]["data_dir"] is None


def test_converting_describes_a_level_records_data_only_where_its_counts_match(cifar_dir, tmp_path):
    from test_data import small_imagefolder

    folder = small_imagefolder(cifar_dir, tmp_path / "small")  # 30 training, 30 test images
    results = tmp_path / "results"

    def level_record(name: str, train: int, val: int, test: int) -> Path:
        path = results / "cpu" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(level=1, train_size=train, val_size=val, test_size=test,
                                        command=f"run.py level 1 --data-dir {folder} --out-dir {tmp_path}/out",
                                        config=dict(data_dir=str(folder), out_dir=f"{tmp_path}/out"),
                                        data_source=f"imagefolder at {folder}")))
        return path

    matching, other = level_record("level1.json", 20, 10, 30), level_record("level2.json", 20, 10, 20)
    report = dict(convert_kept(results))
    kept = json.loads(matching.read_text())
    assert kept["data"]["train_images"] == 30 and kept["data"]["described"].startswith("added at conversion")
    assert "data described" in report[matching][0]
    assert "data" not in json.loads(other.read_text()) and "not its folder's 30 and 30" in report[other][0]
    assert all(local_paths(path.read_text()) == [] for path in (matching, other))
    before = {path: path.read_bytes() for path in (matching, other)}
    convert_kept(results)
    assert {path: path.read_bytes() for path in before} == before
    assert describe_missing_data(kept, "conversion") == ""  # described already: nothing to do


# ----------------------------------------------------------------------------------------------------------
# The peers beside the results


def test_the_peers_record_is_the_colleagues_report_on_the_levels_data():
    peers = load_peers(ROOT / "results")
    assert peers is not None, "results/cpu/peers.json is missing: python run.py record --peers --data-dir DIR"
    assert peers["runs"] == json.loads(json.dumps(PEER_RUNS)) and peers["provenance"] == PROVENANCE
    assert "not a run of this repository's code" in peers["provenance"]["what"]
    assert {m["data"]["fingerprint"] for m in load_records("cpu").values()} == {peers["data"]["fingerprint"]}
    compared = [r for r in peers["runs"] if r["compare_with_levels"]]
    assert [(r["recipe"], r["data"], r["train_images"]) for r in compared] == [
        ("airbench94", "this JPEG copy", 40_000), ("airbench95", "this JPEG copy", 40_000)]  # the levels' split size


def test_the_readme_sets_each_level_against_the_peers_and_says_what_the_jpeg_copy_costs():
    text, peers = README.read_text(), load_peers(ROOT / "results")
    table = text[text.index("<!-- results:start"):text.index("<!-- results:end -->")]
    assert "| against airbench94 / airbench95 |" in table and "trained from scratch" in table
    assert "[record](results/cpu/peers.json)" in table and jpeg_cost_sentence(peers) in table
    for level, m in load_records("cpu").items():
        row = next(line for line in table.splitlines() if line.startswith(f"| [{level}]"))
        assert f"| {against_cell(m, peers)} |" in row
    for peer in compared(peers):  # each same-data peer named with its accuracy and time, the rest in the record
        assert f"{peer['recipe']} {100 * peer['test_accuracy']:.2f}% in {peer['train_seconds'] / 60:.1f} min" in table
    assert f"content fingerprint `{peers['data']['fingerprint']}`" in table


def test_the_peers_cells_from_a_made_up_record(tmp_path):
    peers = dict(runs=[dict(r, test_accuracy=a) for r, a in zip(PEER_RUNS, (0.80, 0.81, 0.90, 0.85, 0.95))])
    assert against_cell(dict(test_accuracy=0.8250), peers) == "+2.50 / -2.50 points"
    assert against_cell(None, peers) == "—" and against_cell(dict(test_accuracy=0.9), None) == "—"
    assert jpeg_cost_sentence(peers).endswith("the copy costs a from-scratch recipe about 9.0 points, and the "
                                              "smaller training set about 1.0 more.")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "level2.json").write_text(json.dumps(fake_record(2, 0.9043, {})))
    text = render_readme(README.read_text(), tmp_path)  # no peers record: said, and no column numbers
    assert "No peer record kept yet" in text
    row = next(line for line in text.splitlines() if line.startswith("| [2]"))
    assert "| — |" in row and "| against the peers |" in text
