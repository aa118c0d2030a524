"""The one table at the end of benchmarks/gpu_check.sh: CUDA tests, overhead ratios, extra memory.

Exit status 1 when a CUDA test failed or errored, when none ran on a GPU machine (skipped there means the
check did not check), or, in a dry run, when a CUDA test did not skip (it would need a GPU the dry run lacks).
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def tests(xml: Path) -> tuple[list[str], list[str], list[str]]:
    """(passed, failed or errored, skipped) test ids from pytest's JUnit XML."""
    passed, failed, skipped = [], [], []
    if not xml.is_file():
        return passed, ["<no test report: pytest did not run>"], skipped
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
        else:
            passed.append(name)
    return passed, failed, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args()
    passed, failed, skipped = tests(args.out / "cuda-tests.xml")
    problems = [f"FAILED {n}" for n in failed]
    if args.dry_run and passed:
        problems += [f"RAN WITHOUT A GPU (must skip) {n}" for n in passed]
    if not args.dry_run and skipped:
        problems += [f"SKIPPED ON A GPU MACHINE {n}" for n in skipped]
    if not (passed or failed or skipped):
        problems.append("no CUDA test was collected")
    gpu = (args.out / "gpu.txt").read_text().strip() if (args.out / "gpu.txt").is_file() else "none (dry run)"
    width = 100
    print("=" * width)
    print(f"GPU check{' (DRY RUN on CPU)' if args.dry_run else ''} — device: {gpu} — {args.seconds} s")
    print("-" * width)
    print(f"CUDA tests: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    for p in problems:
        print(f"  {p}")
    for title, name in (("overhead (benchmarks/overhead.py)", "overhead.txt"),
                        ("extra peak memory (benchmarks/memory_overhead.py)", "memory.txt")):
        print("-" * width)
        print(title)
        path = args.out / name
        text = path.read_text().strip() if path.is_file() else ""
        print(text or "  (no output: see the stage's .err file)")
        if not text:
            problems.append(f"no {name}")
    print("=" * width)
    if problems:
        print("GPU CHECK FAILED:", "; ".join(problems), file=sys.stderr)
        return 1
    print("GPU check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
