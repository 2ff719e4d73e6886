"""Kept records hold no local paths: where the data, the weights and the output folder lay on the machine that
made a run says nothing to a reader, and names that machine's folders. What the data *is* is kept instead
(`data`: format, counts, content fingerprint; common/data.py's describe_data).

- scrub_paths(record): the record with its --data-dir, --out-dir and --weights as placeholders (DATA, OUT,
  WEIGHTS/file.pth, and NAME=WEIGHTS/file.pth for Level 4's pairs), in its command, its config, its data_source
  and in every text that quotes them; any other absolute path left becomes LOCAL/<its last part>.
- describe_missing_data(record, when): a record made before runs described their data gets the description from
  the folder its data_source names, where that folder is on this machine and its image counts are the record's.
- convert_kept(results_dir): both, for every kept record in results/ (`python run.py record --convert-kept`),
  idempotent. `python run.py record` applies them to each run it files (common/runner/filing.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from common.io import write_json_atomic
from common.models import weight_pairs

DATA, OUT, WEIGHTS, LOCAL = "DATA", "OUT", "WEIGHTS", "LOCAL"
LEGEND = {
    DATA: "the --data-dir folder the run read (what was in it: the record's `data`, where it has one)",
    OUT: "the --out-dir folder the run wrote to",
    WEIGHTS: "the folder of the --weights files",
    LOCAL: "another folder of the machine that made the run",
}
PATH_FLAGS = {"--data-dir": DATA, "--out-dir": OUT, "--weights": WEIGHTS}

# An absolute path on some machine: /a/b... (two parts at least; not inside a URL, a glob or a relative path), ~/...,
# C:\...
_TAIL = r"[^\s\"'`()\[\],;:|<>*]*"
LOCAL_PATH = re.compile(rf"(?<![\w.:/~*}}\\-])(?:~|/[\w.+-]+)/{_TAIL}|(?<![\w])[A-Za-z]:\\{_TAIL}")


def local_paths(text: str) -> list[str]:
    """The absolute paths of some machine that `text` holds (tests/test_readme.py checks results/ and the README)."""
    return LOCAL_PATH.findall(text)


def _is_local(value) -> bool:
    return isinstance(value, str) and bool(LOCAL_PATH.fullmatch(value.rstrip("/\\") + "/x") or
                                           LOCAL_PATH.fullmatch(value))


def _last_part(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1]


def weights_placeholder(value: str) -> str:
    """"/a/x.pth" -> "WEIGHTS/x.pth"; "lite2=/a/y.pth,lite0=/b/z.pth" -> "lite2=WEIGHTS/y.pth,lite0=WEIGHTS/z.pth"
    (the flag read as the levels read it: common.models.weight_pairs)."""
    return ",".join(f"{name}={WEIGHTS}/{_last_part(file)}" if name else f"{WEIGHTS}/{_last_part(file)}"
                    for name, file in weight_pairs(value).items())


def _weight_files(value: str | None) -> list[str]:
    return list(weight_pairs(value).values()) if value else []


def _placeholder_for(flag: str, value: str) -> str:
    return weights_placeholder(value) if flag == "--weights" else PATH_FLAGS[flag]


def command_with_placeholders(command: str) -> str:
    """The command with the values of --data-dir, --out-dir and --weights as placeholders (given as `--flag VALUE`
    or `--flag=VALUE`, absolute or relative), and the script named from the repository's root."""
    tokens = command.split(" ")
    for i, token in enumerate(tokens):
        flag, equals, value = token.partition("=")
        if flag in PATH_FLAGS and equals:
            tokens[i] = f"{flag}={_placeholder_for(flag, value)}"
        elif i > 0 and tokens[i - 1] in PATH_FLAGS and not token.startswith("--"):
            tokens[i] = _placeholder_for(tokens[i - 1], token)
    script = tokens[0] if tokens else ""
    if _is_local(script):  # python /home/me/cifar/run.py ...: the script, from the repository's root
        tokens[0] = script[script.rindex("/levels/") + 1:] if "/levels/" in script else _last_part(script)
    return " ".join(tokens)


def _flag_values(command: str) -> dict[str, str]:
    tokens, found = command.split(" "), {}
    for i, token in enumerate(tokens):
        flag, equals, value = token.partition("=")
        if flag in PATH_FLAGS and equals:
            found[flag] = value
        elif token in PATH_FLAGS and i + 1 < len(tokens):
            found[token] = tokens[i + 1]
    return found


def _runs(node) -> list[dict]:
    """Every dict in a record that describes a run (holds a command or a config): a level's record itself, a
    comparison's two runs, a benchmark."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("command"), str) or isinstance(node.get("config"), dict):
            found.append(node)
        for value in node.values():
            found += _runs(value)
    elif isinstance(node, list):
        for value in node:
            found += _runs(value)
    return found


def _known_paths(run: dict) -> dict[str, str]:
    """{absolute path: placeholder} for the folders and files a run named: its data, output and weights."""
    config, flags = run.get("config") or {}, _flag_values(run.get("command") or "")
    pairs = {}
    for field, flag in (("data_dir", "--data-dir"), ("out_dir", "--out-dir")):
        for value in (config.get(field), flags.get(flag)):
            if _is_local(value):
                pairs[value.rstrip("/\\")] = PATH_FLAGS[flag]
    for value in (config.get("weights"), flags.get("--weights")):
        for file in _weight_files(value):
            if _is_local(file):
                pairs[file] = f"{WEIGHTS}/{_last_part(file)}"
    folder = (run.get("data_source") or "").partition(" at ")[2]
    if _is_local(folder) and config.get("data_dir") is None and "--data-dir" not in flags:  # from CIFAR10_DIR
        pairs[folder.rstrip("/\\")] = DATA
    return pairs


def _data_source(source: str, data_dir: str | None) -> str:
    """"imagefolder at /x/cifar10-jpeg" -> "imagefolder at DATA", or "... at DATA/cifar10-jpeg" when the run
    found its layout one folder below --data-dir."""
    kind, at, folder = source.partition(" at ")
    if not at or folder.split("/")[0] == DATA:
        return source
    base = (data_dir or "").rstrip("/\\")
    below = folder[len(base):] if base and (folder == base or folder.startswith(base + "/")) else ""
    return f"{kind} at {DATA}{below}"


def scrub_paths(original: dict) -> dict:
    """A copy of the record with no local path: see the module's docstring. Applying it twice changes nothing."""
    record = json.loads(json.dumps(original, default=str))
    pairs = {}
    for run in _runs(record):
        pairs.update(_known_paths(run))
    for run in _runs(record):
        config = run.get("config") if isinstance(run.get("config"), dict) else {}
        data_dir = config.get("data_dir") or _flag_values(run.get("command") or "").get("--data-dir")
        if isinstance(run.get("data_source"), str):
            run["data_source"] = _data_source(run["data_source"], data_dir)
        if isinstance(run.get("command"), str):
            run["command"] = command_with_placeholders(run["command"])
        for field, placeholder in (("data_dir", DATA), ("out_dir", OUT)):
            if config.get(field) is not None:
                config[field] = placeholder
        if config.get("weights"):
            config["weights"] = weights_placeholder(config["weights"])
    known = re.compile("|".join(rf"(?<![\w.-]){re.escape(path)}(?=$|[/\s\"'`),;:|\].])"
                                for path in sorted(pairs, key=len, reverse=True))) if pairs else None

    def clean(text: str) -> str:
        if known:
            text = known.sub(lambda found: pairs[found.group(0)], text)
        return LOCAL_PATH.sub(lambda found: f"{LOCAL}/{_last_part(found.group(0).rstrip('.'))}"
                              + ("." if found.group(0).endswith(".") else ""), text)

    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return clean(node) if isinstance(node, str) else node

    scrubbed = walk(record)
    if scrubbed != original or "placeholders" in original:
        text = json.dumps({k: v for k, v in scrubbed.items() if k != "placeholders"})
        scrubbed["placeholders"] = {name: what for name, what in LEGEND.items() if re.search(rf"\b{name}\b", text)}
    return scrubbed


def describe_missing_data(m: dict, when: str) -> str:
    """For a level's record without `data` (made before runs described their data): describe the folder its
    data_source names, if that folder is on this machine, holds that layout and exactly the record's image counts
    (40,000 + 10,000 training images and 10,000 test images for a full-data run). The description says it was
    added at `when` ("conversion", "filing"). -> what was done, or why not ("" when there was nothing to do)."""
    if m.get("data") or not isinstance(m.get("data_source"), str):
        return ""
    kind, _, folder = m["data_source"].partition(" at ")
    if not _is_local(folder) or not Path(folder).is_dir():
        return f"data not described: its data_source (`{m['data_source']}`) names no folder on this machine"
    from common.data import LAYOUT_WORDS, DataError, load_described

    try:
        _, _, data = load_described(folder, download=False)
    except DataError as problem:
        return f"data not described: its folder does not load ({str(problem).splitlines()[0]})"
    wanted = ((m.get("train_size") or 0) + (m.get("val_size") or 0), m.get("test_size"))
    if data["layout"] != LAYOUT_WORDS.get(kind) or wanted != (data["train_images"], data["test_images"]):
        return (f"data not described: the record's {wanted[0]:,} training (train + validation) and {wanted[1] or 0:,} "
                f"test images ({LAYOUT_WORDS.get(kind, kind)}) are not its folder's {data['train_images']:,} and "
                f"{data['test_images']:,} ({data['layout']})")
    m["data"] = dict(data, described=(
        f"added at {when}, {time.strftime('%Y-%m-%d')}: the run did not describe its data, so this describes the "
        f"folder its data_source names, as found on the machine that did the {when}, with the record's image "
        f"counts ({wanted[0]:,} training, {wanted[1]:,} test)"))
    return (f"data described ({data['files']}, {data['train_images']:,} + {data['test_images']:,} images, "
            f"fingerprint {data['fingerprint']})")


def convert_kept(results_dir: Path) -> list[tuple[Path, list[str]]]:
    """Every kept record in results_dir (any depth) brought up to date: a level's record without `data`
    described from its folder where it can be (describe_missing_data), and every local path made a placeholder
    (scrub_paths). Records already converted are left as they are. -> (record, what changed) for each."""
    report = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        before = json.loads(path.read_text())
        record, notes = json.loads(path.read_text()), []
        if "level" in record:
            notes.append(describe_missing_data(record, "conversion"))
        record = scrub_paths(record)
        found = local_paths(json.dumps(before, ensure_ascii=False))
        if found:
            notes.append(f"{len(found)} local path(s) made placeholders")
        if record != before:
            write_json_atomic(path, record)
        report.append((path, [note for note in notes if note] or ["unchanged"]))
    return report
