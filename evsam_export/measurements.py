"""Result files of benchmark commands: one JSON file per measured row, rendered into docs/benchmarks.md.

A row is `RESULTS_DIR/<table>/<key>.json`: re-measuring the same row replaces its file, so the page always
shows the latest value of each measurement with when (date, commit), where (CPU, flags, cores, load) and how
(the exact command) it was taken.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

RESULTS_ENV = "EVSAM_RESULTS_DIR"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def results_dir(explicit: Path | None = None) -> Path | None:
    """Where a benchmark command records its rows: the explicit option, else $EVSAM_RESULTS_DIR, else nowhere."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else None


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts() -> dict:
    """CPU model, the SIMD flags that decide lower-precision speed, cores and the 1-minute load at measuring time."""
    from evsam_export.environment import cpu_flags, cpu_model

    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "load": load}


def record_measurement(directory: Path | None, table: str, key: str, values: dict, command: str | None = None,
                       note: str = "") -> Path | None:
    """Write one row (replacing an earlier measurement of the same table and key); None when not recording."""
    if directory is None:
        return None
    row = {
        "table": table,
        "key": key,
        "values": values,
        "note": note,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        **machine_facts(),
        "command": command or " ".join(["evsam-export", *sys.argv[1:]]),
    }
    path = Path(directory) / _SAFE.sub("-", table) / f"{_SAFE.sub('-', key)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
