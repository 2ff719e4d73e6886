"""The README stays short and true: at most 200 lines, the set-up commands first, every link and image
resolving, and its results table and pictures exactly what the kept records in results/ give
(`python run.py summary --readme`). Also: `python run.py record` files only finished full-data runs.
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

    # the README made from that record shows its number and its picture
    text = render_readme(README.read_text(), site / "results")
    assert f"{100 * source['test_accuracy']:.2f}%" in text
    assert "![Level 1's learning curves](docs/img/level1-curves.png)" in text


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
