"""Execute notebooks in a fresh kernel and record how long each takes.

    python benchmarks/notebook_times.py                      # every notebooks/*.ipynb, full size
    python benchmarks/notebook_times.py --fast               # the same under DSLIB_FAST=1 (CI sizes)
    python benchmarks/notebook_times.py notebooks/01_kv_cache.ipynb --fast --full   # both modes, one notebook

Prints seconds per notebook and merges the rows into data/notebook_times.csv (columns: notebook, mode,
seconds, cpu_count, torch, date); a row of the same notebook and mode is replaced. The notebooks on disk are
not modified (they are executed in memory). Kernel start-up is included in the time, as a learner would see it.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["notebook", "mode", "seconds", "cpu_count", "torch", "date"]


def run_notebook(path: Path, fast: bool, timeout: int) -> float:
    """Execute `path` top to bottom in a new kernel; return wall seconds. Raises on the first failing cell.

    Uses the same executor as `make html` (`tools.export_html.execute`: IPC kernel sockets, robust polling)."""
    sys.path.insert(0, str(ROOT))
    from tools.export_html import execute

    env = {"DSLIB_FAST": "1"} if fast else {}
    if not fast:
        os.environ.pop("DSLIB_FAST", None)
    start = time.perf_counter()
    execute(path, timeout=timeout, env=env)
    return time.perf_counter() - start


def merge_rows(csv_path: Path, rows: list[dict]) -> None:
    old = []
    if csv_path.exists():
        with csv_path.open() as f:
            old = [r for r in csv.DictReader(f)]
    new_keys = {(r["notebook"], r["mode"]) for r in rows}
    kept = [r for r in old if (r.get("notebook"), r.get("mode")) not in new_keys]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in sorted(kept + rows, key=lambda r: (r["notebook"], r["mode"])):
            writer.writerow({k: r.get(k, "") for k in FIELDS})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--fast", action="store_true", help="run with DSLIB_FAST=1 (CI sizes)")
    parser.add_argument("--full", action="store_true", help="run full size (the default unless --fast is given)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "notebook_times.csv", help="CSV to merge into")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if not paths:
        parser.error("no notebooks found in notebooks/")
    modes = (["full"] if args.full or not args.fast else []) + (["fast"] if args.fast else [])

    import torch

    rows, failed = [], []
    for path in paths:
        path = Path(path).resolve()
        for mode in modes:
            print(f"{path.name} [{mode}] ...", end=" ", flush=True)
            try:
                seconds = run_notebook(path, fast=(mode == "fast"), timeout=args.timeout)
            except Exception as err:  # report and go on with the others
                print(f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                failed.append(f"{path.name} [{mode}]")
                continue
            print(f"{seconds:.1f} s")
            rows.append({"notebook": path.name, "mode": mode, "seconds": f"{seconds:.1f}",
                         "cpu_count": os.cpu_count(), "torch": torch.__version__,
                         "date": dt.datetime.now().isoformat(timespec="seconds")})
    if rows:
        merge_rows(args.out, rows)
        print(f"wrote {len(rows)} row(s) to {args.out}")
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
