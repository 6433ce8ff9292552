"""Full-size export of every variant, one subprocess each: wall time and peak memory for docs/benchmarks.md.

    python scripts/export_all_variants.py --output /tmp/evsam-all [--variants l0,l1,l2,xl0,xl1]

Each variant is exported by the real CLI in its own process (so peak RSS is that export's alone) and
then validated with the default suite; one JSON line per variant is printed and appended to --log.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# This interpreter's package (a checkout on PYTHONPATH included), not whichever `evsam-export` is on PATH.
CLI = [sys.executable, "-m", "evsam_export.cli"]


def run(cmd: list[str]) -> tuple[int, float, float, str]:
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far: run the heaviest last or read per-run.
    return proc.returncode, time.perf_counter() - started, max(peak_kb, before) / 1024, (proc.stdout + proc.stderr)[-2000:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, default=Path("/tmp/evsam-all"))
    parser.add_argument("--variants", default="l0,l1,l2,xl0,xl1")
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--no-validate", action="store_true")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        folder = args.output / variant
        code, seconds, peak_mb, tail = run(
            ["/usr/bin/time", "-f", "MAXRSS_KB=%M", *CLI, "export", "--variant", variant, "--output", str(folder), "--force"]
        )
        rss = [line for line in tail.splitlines() if line.startswith("MAXRSS_KB=")]
        record = {
            "variant": variant,
            "export_exit": code,
            "export_s": round(seconds, 1),
            "export_peak_rss_mb": round(int(rss[-1].split("=")[1]) / 1024) if rss else None,
            "sizes_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(folder.glob("*.onnx"))} if folder.exists() else {},
        }
        if code != 0:
            record["error"] = tail[-500:]
        elif not args.no_validate:
            vcode, vseconds, _, vtail = run([*CLI, "validate", str(folder)])
            record.update({"validate_exit": vcode, "validate_s": round(vseconds, 1), "validate_tail": vtail.splitlines()[-6:]})
        line = json.dumps(record)
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
