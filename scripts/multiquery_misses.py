"""Which answers a multi-query run lost, and whether each is another key's value from its context.

Reads the runs of one ``uncomp eval needle --questions N`` results folder (``full`` and the
compressed runs): for each run, the questions it answered wrong, and of those how many answered
with the value of another key hidden in the same context (the key not bound to its value) — for
the full cache's own misses, and for the answers a compressed run lost that the full cache got.

  python scripts/multiquery_misses.py uncomp-eval/multiquery-smollm2-135m-<hash>
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load(run: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (run / "predictions.jsonl").read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    full = load(args.folder / "full")
    values: dict[str, set[str]] = {}  # context (the id without -q<n>) -> every key's value
    for key, row in full.items():
        values.setdefault(key.rsplit("-q", 1)[0], set()).update(row["answers"])

    def confused(row: dict) -> bool:
        number = re.findall(r"\d+", row["prediction"])
        return bool(number) and number[0] in values[row["id"].rsplit("-q", 1)[0]] - set(row["answers"])

    missed = [row for row in full.values() if not row["scores"]["exact_match"]]
    print(f"full: {len(full) - len(missed)} of {len(full)} answered; of its {len(missed)} misses, "
          f"{sum(map(confused, missed))} are another key's value")
    for run in sorted(p for p in args.folder.iterdir() if p.is_dir() and p.name != "full"):
        rows = load(run)
        answered = [k for k, row in full.items() if row["scores"]["exact_match"]]
        lost = [rows[k] for k in answered if not rows[k]["scores"]["exact_match"]]
        kept = len(answered) - len(lost)
        print(f"{run.name}: keeps {kept} of full's {len(full) - len(missed)}; of the {len(lost)} lost, "
              f"{sum(map(confused, lost))} are another key's value")


if __name__ == "__main__":
    main()
