"""OUT/levelN/metrics.json: the one place that writes it and reads it back.

metrics.json is the contract between the levels, the summary and the runner: level, status, test_accuracy and
val_accuracy (fractions), split sizes, per-epoch history, timings, the config actually used, the environment,
quick (smoke run or not) and the figures' paths. A level rewrites it after every epoch with status `running`,
and at the end with `complete`, `interrupted` (Ctrl-C) or `failed`. A process killed outright (SIGKILL, an
out-of-memory kill, a closed laptop) cannot write anything: its file still says `running`, with the id of a
process that no longer exists, and load_metrics() reports it as `interrupted`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from common.io import write_json_atomic

LEVEL_NUMBERS = (1, 2, 3, 4)


def metrics_path(out_dir: Path, level: int) -> Path:
    return Path(out_dir) / f"level{level}" / "metrics.json"


def this_process() -> dict:
    return dict(pid=os.getpid(), host=socket.gethostname())


def write_metrics(out_dir: Path, level: int, metrics: dict) -> Path:
    return write_json_atomic(metrics_path(out_dir, level), metrics)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def effective_status(metrics: dict) -> str:
    """The status as recorded, except that a `running` run whose process is gone from this machine was killed."""
    status = metrics.get("status")
    process = metrics.get("process") or {}
    if status == "running" and process.get("host") == socket.gethostname() and not _alive(process.get("pid", -1)):
        return "interrupted"
    return status


def load_metrics(out_dir: Path) -> dict[int, dict]:
    """Every level's metrics.json in `out_dir`, with `status` made effective (see above)."""
    found = {}
    for level in LEVEL_NUMBERS:
        path = metrics_path(out_dir, level)
        if not path.is_file():
            continue
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            found[level] = dict(level=level, status=f"unreadable metrics.json ({path})")
            continue
        recorded = metrics.get("status")
        metrics["status"] = effective_status(metrics)
        if metrics["status"] != recorded:
            metrics["recorded_status"] = recorded
        found[level] = metrics
    return found
