"""The `mopd` command line: run a recipe, run the bundled demo, compare methods, rebuild a report."""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


THREADS_HELP = ("torch CPU threads (default: torch's choice, one per core). Use 1 per process when several "
                "recipes share a few cores: their OpenMP threads otherwise wait on each other. Results are "
                "reproducible for a given thread count")


def _prepare_process(threads: int | None) -> None:
    """Before any compute: the allocator setting of `mopd.runtime` and the thread count, if one is given."""
    from .runtime import keep_freed_memory

    keep_freed_memory()
    cores = os.cpu_count() or 1
    if threads is not None and threads > 8 * cores:
        _fail(f"--threads {threads}: more than 8 threads per core ({cores} cores here) only slows a run down")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def bundled_recipe(name: str) -> Path:
    return Path(str(resources.files("mopd") / "recipes" / f"{name}.yaml"))


def _run_or_fail(loaded, out: Path) -> dict | None:
    """`run_recipe`, with every error a user can cause or meet mid-run printed as its one line (exit 2)."""
    from .core.errors import StageError
    from .recipe.runner import RunLockedError, run_recipe
    from .teachers.preflight import PreflightError

    try:
        return run_recipe(loaded, out, console)
    except (PreflightError, StageError, RunLockedError) as e:
        _fail(str(e))
    return None


def _run(recipe: Path, out: Path | None) -> None:
    from .recipe.load import RecipeError, load_recipe

    try:
        loaded = load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e))
    out = out or Path("runs") / loaded.recipe.name
    summary = _run_or_fail(loaded, out)
    if summary is not None:
        score = summary["normalized_score"]
        console.print(f"normalized score: {score:.3f}" if score is not None else "normalized score: n/a")
        console.print(f"report: {out / 'report.md'}")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="the recipe YAML file"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """Run a recipe end to end; finished stages are skipped, an interrupted one resumes."""
    _prepare_process(threads)
    _run(recipe, out)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """The bundled demo: tiny base -> SFT -> one RL teacher per domain -> MOPD student, on this CPU."""
    _prepare_process(threads)
    _run(bundled_recipe("demo"), out)


@app.command()
def compare(
    recipe: Path = typer.Argument(..., help="a recipe with a `compare:` block (bundled: compare)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """Run every method of a comparison recipe (cached stages are reused) and write compare.md, compare.json,
    compare_bars.png and sample_efficiency.png: the MOPD paper's table of merge methods."""
    from .recipe.compare import compare_plan
    from .recipe.load import RecipeError, load_recipe

    if not recipe.exists() and bundled_recipe(str(recipe)).exists():
        recipe = bundled_recipe(str(recipe))
    try:
        loaded = load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e))
    if loaded.recipe.compare is None:
        _fail(f"{recipe}: no `compare:` block; `mopd run` runs a recipe without one")
    _prepare_process(threads)
    from .report.compare import build_compare

    out = out or Path("runs") / loaded.recipe.name
    _run_or_fail(loaded, out)
    result = build_compare(out, compare_plan(loaded))
    for label, m in result["methods"].items():
        score = m["normalized_score"]
        console.print(f"{label:<24} normalized score {'n/a' if score is None else f'{score:.3f}'}"
                      f"  student samples {m['samples']:,}")
    console.print(f"table: {out / 'compare.md'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory written by `mopd run`")) -> None:
    """Rebuild report.md, the PNG curves and summary.json from a run directory's saved metrics."""
    from .report import build_report

    try:
        summary = build_report(run_dir)
    except ValueError as e:
        _fail(str(e))
    console.print(f"normalized score: {summary['normalized_score']}")
    console.print(f"report: {run_dir / 'report.md'}")
    if summary.get("missing_stages"):
        _fail(f"{run_dir}: incomplete run: no finished checkpoint for {', '.join(summary['missing_stages'])}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
