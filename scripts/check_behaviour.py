"""Prove that a change to the package changes no number: run one recipe with two versions of the code, compare.

Why: a behaviour-preserving refactor has to leave every result bit for bit as it was, on the same machine and
thread count. Unit tests check properties within tolerances; this checks exact equality of everything a run
writes, for every stage kind and every MOPD objective (scripts/behaviour_recipe.yaml covers them all).

    .venv/bin/python scripts/check_behaviour.py --against REV [--current REV2] [--recipe FILE] [--threads 1]
                                                [--keep DIR] [--gpu]

It checks out REV into a temporary `git worktree`, runs `python -m mopd run RECIPE --out DIR --threads N` with
PYTHONPATH=<worktree>/src (checked: the subprocess's `mopd.__file__` must lie in that tree, not in the editable
install), then runs the same recipe with the current checkout's code (PYTHONPATH=<repo>/src), or with a second
worktree of REV2 given `--current`, in a fresh output directory. The two runs are sequential, with the same
environment, thread count and PYTHONHASHSEED, from one copy of the recipe. Then, one line per file:

- <stage>/metrics.jsonl: every record, every key, exact float equality (repr: -0.0 != 0.0, nan == nan);
- <stage>/final/mopd.json: `metrics`, and the rest of the lineage (run-directory paths normalised);
- <stage>/final/eval.json (eval stages), <stage>/preflight.json (mopd stages);
- sha256 of every *.safetensors under each stage (final checkpoint, LoRA adapter, kept snapshots);
- summary.json and run.json (stage identities, order, report block).

Wall-clock values are dropped before comparing: keys `time`, `wall_seconds`, `elapsed_seconds`, `started_at`,
`ended_at` and any other key ending in `_seconds`; so are stage settings recorded on one side only (a field a
newer schema added, named in the line); so are a lineage's checksums of its own files (`checksum`,
`files`, `metrics_log`), which cover such values. Exit status 0 when everything is identical, 1 otherwise (a difference, a missing
file, or a side that failed to run), 130 when interrupted; the worktrees are removed in every case. CUDA is
hidden from both runs unless `--gpu` (CPU results are the ones that are reproducible bit for bit).

With the bundled recipe one side takes about 13 s with --threads 1 on a 2-core machine (7.5 s of stages, the
rest is starting Python and importing torch and transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "scripts" / "behaviour_recipe.yaml"
# wall-clock keys, and the memory budget a stage found free (stage.json `sizing`): they differ between two runs
TIMING_KEYS = frozenset({"time", "wall_seconds", "elapsed_seconds", "started_at", "ended_at", "budget_bytes"})
# a lineage's checksums of its own files: they cover wall-clock values (the metrics log's `time`, the model card's
# metrics), so they differ between identical runs; the files they cover are compared themselves
LINEAGE_BOOKKEEPING = frozenset({"checksum", "files", "metrics_log"})
STAGE_JSON_FILES = ("final/eval.json", "preflight.json")
MAX_SHOWN = 160  # characters of a value shown in a difference line


@dataclass
class Side:
    """One version of the code: where its package lives and where its run goes."""

    label: str  # "against" or "current"
    description: str  # e.g. "HEAD (407055f...)" or "working tree /work/main"
    src: Path  # the directory put on PYTHONPATH (holds the `mopd` package)
    out: Path  # the run directory
    log: Path  # the run's stdout and stderr
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------- git


def git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def resolve_commit(rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {rev!r} is not a commit of {REPO}")
    return done.stdout.strip()


class Worktrees:
    """Temporary detached worktrees of this repository, removed on exit (also on error or Ctrl-C)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def add(self, path: Path, commit: str) -> Path:
        git("worktree", "add", "--detach", "--quiet", str(path), commit)
        self.paths.append(path)
        return path

    def remove_all(self) -> None:
        for path in reversed(self.paths):
            done = subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"warning: could not remove worktree {path}: {done.stderr.strip()}", file=sys.stderr)
        self.paths.clear()
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


# ----------------------------------------------------------------------------------------------- running


def side_env(src: Path, threads: int, gpu: bool) -> dict[str, str]:
    """The environment of a run: the caller's, with only `src` on PYTHONPATH and fixed hashing and threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)  # ahead of site-packages, so ahead of the editable install's .pth entry
    env["PYTHONHASHSEED"] = "0"  # same set/dict-of-str iteration order in both runs
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave no __pycache__ in the working tree
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_import(python: str, side: Side, env: dict[str, str], cwd: Path) -> None:
    """Fail unless a subprocess with this environment imports `mopd` from `side.src`."""
    done = subprocess.run([python, "-c", "import mopd; print(mopd.__file__)"], env=env, cwd=cwd,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {side.label}: cannot import mopd from {side.src}:\n{done.stderr.strip()}")
    imported = Path(done.stdout.strip()).resolve()
    expected = (side.src / "mopd" / "__init__.py").resolve()
    if imported != expected:
        raise SystemExit(f"error: {side.label}: mopd is imported from {imported}, not from {expected}")
    print(f"{side.label}: {side.description}; mopd imported from {imported}")


def run_side(python: str, side: Side, recipe: Path, threads: int, gpu: bool, cwd: Path, kept: bool) -> bool:
    """Run the recipe with this side's code; True when it finished (exit status 0)."""
    env = side_env(side.src, threads, gpu)
    check_import(python, side, env, cwd)
    cmd = [python, "-m", "mopd", "run", str(recipe), "--out", str(side.out), "--threads", str(threads)]
    t0 = time.perf_counter()
    with side.log.open("w") as log:
        code = subprocess.run(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT).returncode
    side.seconds = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(side.log.read_text(errors="replace").splitlines()[-25:])
        where = f"log {side.log}" if kept else "rerun with --keep DIR to keep its log"
        print(f"{side.label}: FAILED (exit {code}) after {side.seconds:.1f} s ({where}); last lines:\n{tail}")
        return False
    print(f"{side.label}: ran in {side.seconds:.1f} s")
    return True


# ----------------------------------------------------------------------------------------------- comparing


def normalise(value: Any, run_dir: Path) -> Any:
    """Drop wall-clock keys at any depth; write the run directory as <RUN> in strings (the two runs differ)."""
    if isinstance(value, dict):
        return {k: normalise(v, run_dir) for k, v in value.items()
                if k not in TIMING_KEYS and not k.endswith("_seconds") and not k.startswith("time/")}
    if isinstance(value, list):
        return [normalise(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(str(run_dir.resolve()), "<RUN>").replace(str(run_dir), "<RUN>")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, float) else repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Every leaf where `a` and `b` differ, as 'path: a vs b'. Types must match too (1 vs 1.0 differs), and
    floats compare by repr, which round-trips exactly (so -0.0 differs from 0.0 and nan equals nan)."""
    where = path or "<top>"
    if type(a) is not type(b):
        yield f"{where}: {_show(a)} ({type(a).__name__}) vs {_show(b)} ({type(b).__name__})"
    elif isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in b:
                yield f"{sub}: {_show(a[key])} vs <missing>"
            elif key not in a:
                yield f"{sub}: <missing> vs {_show(b[key])}"
            else:
                yield from differences(a[key], b[key], sub)
    elif isinstance(a, list):
        if len(a) != len(b):
            yield f"{where}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from differences(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        if repr(a) != repr(b):
            yield f"{where}: {a!r} vs {b!r}"
    elif a != b:
        yield f"{where}: {_show(a)} vs {_show(b)}"


def verdict(diffs: list[str]) -> str:
    if not diffs:
        return "same"
    more = f" (and {len(diffs) - 1} more difference{'s' if len(diffs) > 2 else ''})" if len(diffs) > 1 else ""
    return f"DIFFERS: {diffs[0]}{more}"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compare_metrics(a: Path, b: Path, run_a: Path, run_b: Path) -> str:
    rows_a = [normalise(r, run_a) for r in read_jsonl(a)]
    rows_b = [normalise(r, run_b) for r in read_jsonl(b)]
    diffs: list[str] = []
    if len(rows_a) != len(rows_b):
        diffs.append(f"{len(rows_a)} records vs {len(rows_b)}")
    for i, (x, y) in enumerate(zip(rows_a, rows_b, strict=False)):
        step = x.get("step") if isinstance(x, dict) else None
        diffs += [f"record {i + 1} (step {step}) {d}" for d in differences(x, y)]
    return verdict(diffs)


def compare_json(a: Path, b: Path, run_a: Path, run_b: Path, part: str | None = None) -> str:
    """`part`: 'metrics' compares that key only, 'lineage' everything else; None the whole file."""
    x, y = normalise(read_json(a), run_a), normalise(read_json(b), run_b)
    if part == "metrics":
        x, y = x.get("metrics"), y.get("metrics")
    elif part == "lineage":
        x = {k: v for k, v in x.items() if k != "metrics" and k not in LINEAGE_BOOKKEEPING}
        y = {k: v for k, v in y.items() if k != "metrics" and k not in LINEAGE_BOOKKEEPING}
        added = _drop_one_sided_settings(x, y)
        result = verdict(list(differences(x, y)))
        return f"{result} (settings on one side only: {', '.join(added)})" if added and result == "same" else result
    return verdict(list(differences(x, y)))


def _drop_one_sided_settings(x: dict, y: dict) -> list[str]:
    """A stage setting that exists on one side only is a field one version of the schema added (at the top or
    inside a block such as `preflight:`): the lineage records it at its default, and if it changed what is
    trained the metrics and weights show that. Returns the dotted names dropped."""
    sx, sy = x.get("settings"), y.get("settings")
    if not isinstance(sx, dict) or not isinstance(sy, dict):
        return []
    return _drop_one_sided(sx, sy, "")


def _drop_one_sided(sx: dict, sy: dict, prefix: str) -> list[str]:
    dropped = []
    for key in sorted(set(sx) | set(sy)):
        if (key in sx) != (key in sy):
            sx.pop(key, None)
            sy.pop(key, None)
            dropped.append(prefix + key)
        elif isinstance(sx[key], dict) and isinstance(sy[key], dict):
            dropped += _drop_one_sided(sx[key], sy[key], f"{prefix}{key}.")
    return dropped


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_names(run_dir: Path) -> list[str]:
    """Stages in run order (run.json), then any other stage directory (a stage.json marks one)."""
    order: list[str] = []
    if (run_dir / "run.json").is_file():
        order = list(read_json(run_dir / "run.json").get("order", []))
    found = sorted(p.parent.name for p in run_dir.glob("*/stage.json"))
    return order + [s for s in found if s not in order]


class Report:
    """Collects one line per compared file and whether every one was the same."""

    def __init__(self) -> None:
        self.compared = 0
        self.differing = 0

    def line(self, name: str, result: str) -> None:
        self.compared += 1
        self.differing += not result.startswith("same")
        print(f"  {name:<62} {result}", flush=True)


def compare_file(report: Report, rel: str, run_a: Path, run_b: Path, how: str, part: str | None = None) -> None:
    """Compare RUN/rel on both sides (a file present on one side only is a difference)."""
    a, b = run_a / rel, run_b / rel
    name = rel + (f" [{part}]" if part else "")
    if not a.is_file() and not b.is_file():
        return
    if not a.is_file() or not b.is_file():
        report.line(name, f"DIFFERS: {'missing' if not a.is_file() else 'present'} vs "
                          f"{'missing' if not b.is_file() else 'present'}")
        return
    try:
        if how == "jsonl":
            result = compare_metrics(a, b, run_a, run_b)
        else:
            result = compare_json(a, b, run_a, run_b, part)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        result = f"DIFFERS: unreadable ({e})"
    report.line(name, result)


def compare_weights(report: Report, stage: str, run_a: Path, run_b: Path) -> None:
    files_a = {p.relative_to(run_a).as_posix() for p in (run_a / stage).rglob("*.safetensors")}
    files_b = {p.relative_to(run_b).as_posix() for p in (run_b / stage).rglob("*.safetensors")}
    for rel in sorted(files_a | files_b):
        if rel not in files_a or rel not in files_b:
            report.line(rel + " [sha256]", f"DIFFERS: {'present' if rel in files_a else 'missing'} vs "
                                           f"{'present' if rel in files_b else 'missing'}")
            continue
        ha, hb = sha256(run_a / rel), sha256(run_b / rel)
        report.line(rel + " [sha256]", "same" if ha == hb else f"DIFFERS: {ha[:16]}... vs {hb[:16]}...")


def compare_runs(run_a: Path, run_b: Path) -> Report:
    report = Report()
    stages_a, stages_b = stage_names(run_a), stage_names(run_b)
    if stages_a != stages_b:
        report.line("stages", f"DIFFERS: {stages_a} vs {stages_b}")
    for stage in stages_a + [s for s in stages_b if s not in stages_a]:
        print(f"{stage}:")
        compare_file(report, f"{stage}/metrics.jsonl", run_a, run_b, "jsonl")
        compare_file(report, f"{stage}/final/mopd.json", run_a, run_b, "json", "metrics")
        compare_file(report, f"{stage}/final/mopd.json", run_a, run_b, "json", "lineage")
        for rel in STAGE_JSON_FILES:
            compare_file(report, f"{stage}/{rel}", run_a, run_b, "json")
        compare_weights(report, stage, run_a, run_b)
    print("run:")
    compare_file(report, "summary.json", run_a, run_b, "json")
    compare_file(report, "run.json", run_a, run_b, "json")
    return report


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, help="the reference revision (any git rev: HEAD, a sha, a tag)")
    p.add_argument("--current", default=None,
                   help="a revision to compare instead of the working tree (checked out in a worktree too)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the recipe both versions run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of both runs (default 1)")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the two run directories and logs in this (new or empty) directory")
    p.add_argument("--gpu", action="store_true", help="let the runs see CUDA devices (hidden by default)")
    p.add_argument("--python", default=sys.executable, help="the interpreter of both runs (default: this one)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if not args.recipe.is_file():
        p.error(f"--recipe {args.recipe}: not a file")
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        p.error(f"--keep {args.keep}: exists and is not empty")
    return args


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the worktrees and the scratch directory are still removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    against = resolve_commit(args.against)
    current = resolve_commit(args.current) if args.current is not None else None
    scratch = Path(tempfile.mkdtemp(prefix="mopd-behaviour-"))
    work = args.keep.resolve() if args.keep is not None else scratch
    work.mkdir(parents=True, exist_ok=True)
    worktrees = Worktrees()
    try:
        recipe = work / "recipe.yaml"  # one copy: both runs read the same bytes even if the file is edited
        shutil.copyfile(args.recipe, recipe)
        sides = [Side("against", f"{args.against} ({against[:12]})",
                      worktrees.add(scratch / "tree-against", against) / "src", work / "run-against",
                      work / "run-against.log")]
        if current is None:
            sides.append(Side("current", f"working tree {REPO}", REPO / "src", work / "run-current",
                              work / "run-current.log"))
        else:
            sides.append(Side("current", f"{args.current} ({current[:12]})",
                              worktrees.add(scratch / "tree-current", current) / "src", work / "run-current",
                              work / "run-current.log"))
        print(f"recipe {args.recipe} ({sha256(recipe)[:12]}), --threads {args.threads}, python {args.python}")
        for side in sides:  # sequential: the two runs never compete for the cores
            if not run_side(args.python, side, recipe, args.threads, args.gpu, scratch, args.keep is not None):
                print("result: NOT IDENTICAL (a side failed to run)")
                return 1
        report = compare_runs(sides[0].out, sides[1].out)
        timing = ", ".join(f"{s.label} {s.seconds:.1f} s" for s in sides)
        if report.differing:
            print(f"result: NOT IDENTICAL: {report.differing} of {report.compared} files differ ({timing})")
            return 1
        print(f"result: IDENTICAL: all {report.compared} files the same ({timing})")
        return 0
    except KeyboardInterrupt:
        print("interrupted: nothing compared", file=sys.stderr)
        return 130
    finally:
        worktrees.remove_all()
        shutil.rmtree(scratch, ignore_errors=True)
        if args.keep is not None:
            print(f"kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
