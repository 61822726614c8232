"""`make bench`: run every benchmark in this folder and write one results file.

Each benchmark runs as its own process (so peak-memory figures are its own) with its default arguments;
bench_store_retrieval scores the checkpoint `make demo` trained (skipped, with the reason, before a demo run). Output: OUT/<name>.txt with the full
output of each, and OUT/results.md with one table (exit status, wall time, headline) plus every output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The checkpoint `make demo` trains on UCM-Captions (default store): what bench_store_retrieval scores.
DEMO_CHECKPOINT = HERE.parent / "store" / "runs" / "demo-ucm-captions-cpu-small" / "best" / "checkpoint.pt"


def special_args(name: str) -> list[str] | str | None:
    """Extra arguments a benchmark needs, or the reason it is skipped (a str); None: run it as it is."""
    if name == "bench_store_retrieval":
        if DEMO_CHECKPOINT.exists():
            return ["--checkpoint", str(DEMO_CHECKPOINT)]
        return f"needs a trained checkpoint: run `make demo` first (it scores {DEMO_CHECKPOINT.relative_to(HERE.parent)})"
    return None


def discover(only: list[str] | None) -> list[str]:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    return [n for n in names if not only or n in only]


def headline(text: str, lines: int = 3) -> str:
    # Summary lines, not the raw JSON records some benchmarks print last.
    kept = [
        ln.strip()
        for ln in text.strip().splitlines()
        if ln.strip() and not ln.lstrip().startswith(("{", "}"))
    ]
    return " / ".join(kept[-lines:]).replace("|", "\\|")[:400]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-out", help="folder for the outputs (default bench-out)")
    ap.add_argument("--only", nargs="*", help="benchmark module names to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, sections, failed = [], [], 0
    for name in discover(args.only):
        special = special_args(name)
        if isinstance(special, str):
            rows.append(f"| {name} | skipped | – | {special} |")
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(special or [])]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        seconds = time.time() - t0
        text = proc.stdout + (f"\n[stderr]\n{proc.stderr[-4000:]}" if proc.returncode else "")
        (out / f"{name}.txt").write_text(text)
        print(proc.stdout, flush=True)
        failed += proc.returncode != 0
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        rows.append(f"| {name} | {status} | {seconds:.0f} s | {headline(proc.stdout)} |")
        sections.append(f"## {name}\n\n`python -m benchmarks.{name}`\n\n```\n{proc.stdout.strip()}\n```\n")
    table = "| benchmark | status | wall time | headline (last lines) |\n|---|---|---:|---|\n" + "\n".join(
        rows
    )
    (out / "results.md").write_text(f"# Benchmark results\n\n{table}\n\n" + "\n".join(sections))
    print(f"\nresults table: {out / 'results.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
