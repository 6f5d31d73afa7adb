"""Count how many modules one MOPD stage crosses, and how often control comes back to a module already left.

Why: docs/ARCHITECTURE.md draws the path of one MOPD step; this measures it on the code, so a refactor that
claims a shorter path can show it. Run it against any checkout (PYTHONPATH=<tree>/src picks the code):

    .venv/bin/python scripts/count_hops.py [--json FILE]

A tiny recipe (a base pretrained for 2 steps, one RLVR teacher for 1, a MOPD student for 2) runs once to
finish its parents; the student's directory is removed and the recipe runs again under a profiler that follows
only functions of the `mopd` package (calls and returns, so control coming back to a caller counts). Two spans:

- orchestration: from `run_recipe` until the student's stage runner starts (loading excluded: it is measured
  on its own first, from `load_recipe` to its return);
- one step: from the driver's first call of `lr_at` to its second, i.e. one whole training step of the student
  (sampling, teacher scores, loss, backward, update, logging).

For each span: `stays` (maximal runs of control in one module), `modules` (distinct), `returns` (stays in a
module already visited earlier in the span), `edges` (distinct module-to-module transfers) and the path as a
reader follows it, each function once (`first_visit_hops`: changes of module between the first calls of the
span's functions, in call order; loops and repeated helpers count once).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

RECIPE = {
    "name": "hops",
    "seed": 3,
    "domains": ["addition"],
    "eval": {"size": 4, "max_new_tokens": 6, "batch_size": 8},
    "stages": {
        "base": {"kind": "pretrain", "model": {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 2,
                                                "intermediate_size": 64}, "steps": 2, "batch_size": 8},
        "teacher": {"kind": "rlvr", "init": "base", "steps": 1, "batch_size": 2, "group_size": 2},
        "student": {"kind": "mopd", "init": "base", "teachers": {"addition": "teacher"}, "steps": 2,
                    "batch_size": 4},
    },
}


class Span:
    """Control flow inside the mopd package, as the module holding control after each call and return."""

    def __init__(self) -> None:
        self.stays: list[str] = []
        self.edges: set[tuple[str, str]] = set()
        self.first: list[str] = []  # the module of each function's first call, in order (the path as read)
        self.seen: set[object] = set()

    def called(self, code: object, module: str) -> None:
        if code not in self.seen:
            self.seen.add(code)
            if not self.first or self.first[-1] != module:
                self.first.append(module)

    def at(self, module: str) -> None:
        if not self.stays or self.stays[-1] != module:
            if self.stays:
                self.edges.add((self.stays[-1], module))
            self.stays.append(module)

    def summary(self) -> dict:
        seen: set[str] = set()
        returns = 0
        for m in self.stays:
            returns += m in seen
            seen.add(m)
        return {"stays": len(self.stays), "modules": len(seen), "returns": returns, "edges": len(self.edges),
                "first_visit_hops": max(0, len(self.first) - 1), "path": self.stays, "first_visit_path": self.first}


def trace(fn, start: str | None, stop: str | None) -> dict:
    """Run fn() under a profiler; the span opens at the first call of a function named `start` (None: at once)
    and closes at the next call of a function named `stop` (None: when fn returns)."""
    span, stack = Span(), []
    state = {"open": start is None, "done": False}

    def profile(frame, event, arg):
        if state["done"] or event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("mopd.") and module != "mopd":
            return
        name = frame.f_code.co_name
        if event == "call":
            if state["open"] and name == stop:
                state["done"] = True
                return
            if not state["open"] and name == start:
                state["open"] = True
            stack.append(module)
            if state["open"]:
                span.at(module)
                span.called(frame.f_code, module)
        else:
            if stack:
                stack.pop()
            if state["open"] and stack:
                span.at(stack[-1])

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return span.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the counts (and paths) here")
    args = ap.parse_args()
    import torch

    import mopd

    torch.set_num_threads(1)
    print(f"mopd from {Path(mopd.__file__).parent}")
    try:
        from mopd.execution.runner import run_recipe
    except ImportError:  # the layout before the split of recipe/
        from mopd.recipe.runner import run_recipe
    from rich.console import Console

    from mopd.recipe.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hops.yaml"
        path.write_text(yaml.safe_dump(RECIPE))
        out = Path(tmp) / "run"
        quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
        run_recipe(load_recipe(path), out, console=quiet)
        results = {}
        results["loading"] = trace(lambda: load_recipe(path), None, None)
        loaded = load_recipe(path)
        for span, (start, stop) in {"orchestration": ("run_recipe", "run_stage"),
                                    "one_step": ("lr_at", "lr_at")}.items():
            shutil.rmtree(out / "student")
            results[span] = trace(lambda: run_recipe(loaded, out, console=quiet), start, stop)
    for span, r in results.items():
        print(f"{span}: {r['stays']} stays in {r['modules']} modules, {r['returns']} returns to a module already "
              f"left, {r['edges']} distinct hops; read once: {r['first_visit_hops']} hops")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
