"""Record the expected numbers of the bundled recipes at their reduced scale: tests/expected/<recipe>.json.

Why a script: tests/test_recipe_expected.py fails when a change moves a recipe's metrics; when the change is
meant to (a new default, a fixed bug), this re-measures and rewrites the files, which then go into the same
commit, so the diff shows which numbers moved. It runs the recipes exactly as the test does (the same functions,
tests/recipe_expected.py: the same groups, scales and thread count), and records the machine it ran on, whose
kind decides which tolerance the test applies (exact on the same kind, the derived bounds on another).

    .venv/bin/python scripts/record_expected.py                       # every covered recipe, into tests/expected
    .venv/bin/python scripts/record_expected.py --recipes tulu3,demo  # those (their whole groups run)
    .venv/bin/python scripts/record_expected.py --out /tmp/numbers    # write elsewhere, e.g. to diff
    .venv/bin/python scripts/record_expected.py --check               # compare with the stored files, write nothing

A recipe's whole group runs even when one recipe is asked for: recipes of a group share stages, and the test
runs the group together. Prints, per recipe, how many metrics it stores and how many changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.recipe_expected import (  # noqa: E402
    COVERED,
    EXPECTED_DIR,
    GROUPS,
    NOT_RUN,
    check,
    group_of,
    record,
    run_group,
)


def _values(data: dict) -> dict[tuple[str, str], object]:
    return {(stage, key): v for stage, m in data["metrics"].items() for key, v in m.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(COVERED), help="comma-separated bundled recipe names")
    ap.add_argument("--out", type=Path, default=EXPECTED_DIR, help="where the <recipe>.json files go")
    ap.add_argument("--keep", type=Path, help="run into this folder (kept) instead of a temporary one")
    ap.add_argument("--check", action="store_true", help="compare with the stored files instead of writing")
    args = ap.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if bad := [n for n in names if n not in COVERED]:
        why = "; ".join(f"{n}: {NOT_RUN[n]}" for n in bad if n in NOT_RUN)
        raise SystemExit(f"--recipes: not covered {bad}" + (f" ({why})" if why else f"; covered: {', '.join(COVERED)}"))
    groups = list(dict.fromkeys(group_of(n) for n in names))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="mopd-expected-") as tmp:
        root = args.keep or Path(tmp)
        for group in groups:
            t0 = time.time()
            runs = run_group(group, root / group)
            print(f"ran {group} ({', '.join(GROUPS[group].recipes)}) at scale {GROUPS[group].scale:g} "
                  f"in {time.time() - t0:.1f}s", flush=True)
            for name in (n for n in names if n in runs):
                if args.check:
                    lines = check(name, runs[name])
                    failed += bool(lines)
                    print("\n".join(lines) if lines else f"{name}: as stored")
                    continue
                old = args.out / f"{name}.json"
                before = _values(json.loads(old.read_text())) if old.is_file() else {}
                now = _values(record(name, runs[name], args.out))
                moved = sum(1 for k, v in now.items() if k in before and before[k] != v)
                print(f"{name}: {len(now)} metrics -> {args.out / (name + '.json')}"
                      + (f" ({moved} changed, {len(now.keys() - before.keys())} new, "
                         f"{len(before.keys() - now.keys())} gone)" if before else " (new)"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
