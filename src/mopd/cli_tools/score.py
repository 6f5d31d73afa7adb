"""`mopd eval`: score any Hugging Face checkpoint directory on any domains, as a stage's eval would.

Why: comparing a checkpoint from elsewhere (or one from an old run) with a recipe's models should not need a
recipe with an `eval` stage. This is the same held-out evaluation (`eval.evaluate`: each domain's fixed eval set,
greedy decoding, its verifier, each domain's own generation length) with the checkpoint's own tokenizer and
prompt rendering.

Where the domains come from (`plan_eval`): `--recipe R` scores every domain R declares, built by the recipe
loader (registered, plugin, data-backed, tool-use), with R's `eval` settings and prompt rendering; `--domains`
names registered domains, or bundled data as a recipe would declare it (`bundled:math`: see `BUNDLED_DATA`), or,
with `--recipe`, picks some of R's domains. A command-line option overrides the recipe's setting; an explicit
`--max-new-tokens` overrides every domain's own length too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.errors import RecipeError
from ..core.schema import DataDomainSpec, EvalSettings
from ..envs import DomainLike, get_domain, list_domains, load_plugin
from ..envs.data import DataDomainError
from ..eval.evaluate import evaluate, generation_length
from ..eval.transcripts import render, transcripts, write_transcripts
from ..models.checkpoint import load_model, load_tokenizer
from ..models.prompting import prompt_format, with_pad_token
from .bundled import bundled_recipe

# `--domains bundled:NAME` without a recipe: the declaration the bundled qwen3_0.6b recipe gives that data
# (its verifier, and the column holding the reference completion, which exact-match accuracy compares with)
BUNDLED_DATA: dict[str, dict[str, Any]] = {
    "math": {"verifier": "math"},
    "code": {"verifier": "code", "fields": {"answer": "solution"}},
    "instructions": {"verifier": "instructions", "fields": {"answer": "example_response"}},
}
# ... decoded as far as that recipe evaluates them (its eval.max_new_tokens), not the character puzzles' 12
BUNDLED_MAX_NEW_TOKENS = 384


class ScoreError(ValueError):
    """A mistake in what `mopd eval` was asked, as one line (exit status 2)."""


@dataclass
class EvalPlan:
    """What `mopd eval` scores and how: the domains, the eval settings, the prompt rendering, and a generation
    length for every domain when `--max-new-tokens` was given (None: each domain's own, `generation_length`)."""

    domains: list[DomainLike]
    settings: EvalSettings
    chat_template: str = "auto"
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None

    def lengths(self) -> dict[str, int]:
        """{domain: greedy tokens per prompt}, as `eval.evaluate` will decode it."""
        return {d.name: generation_length(d, self.settings, self.max_new_tokens) for d in self.domains}


def parse_names(text: str) -> list[str]:
    """`a,b, c` -> [a, b, c], without empty entries or repeats."""
    return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def load_plugins(plugins: list[Path] | None) -> None:
    for plugin in plugins or []:
        try:
            load_plugin(plugin)
        except Exception as e:  # a user's file: any failure is theirs to read, in one line
            raise ScoreError(f"plugin {plugin}: {e.__class__.__name__}: {e}") from None


def bundled_data_domain(entry: str, settings: EvalSettings) -> DomainLike:
    """`bundled:NAME` as a recipe would declare it (`BUNDLED_DATA`), built by the recipe loader's builder."""
    from ..recipe.resources import data_domain

    name = entry.split(":", 1)[1]
    if name not in BUNDLED_DATA:
        raise ScoreError(f"--domains: {entry!r}: no bundled data set {name!r}; bundled: "
                         + ", ".join(f"bundled:{n}" for n in BUNDLED_DATA))
    try:
        spec = DataDomainSpec(name=name, source=entry, max_new_tokens=BUNDLED_MAX_NEW_TOKENS, **BUNDLED_DATA[name])
        return data_domain(spec, settings, None)
    except DataDomainError as e:
        raise ScoreError(f"--domains: {entry!r}: {e}") from None


def resolve_domains(names: list[str], plugins: list[Path] | None = None,
                    settings: EvalSettings | None = None) -> list[DomainLike]:
    """Each named domain from the registry, after `plugins` have registered theirs; `bundled:NAME` entries are
    the bundled data sets, held out by `settings` as a recipe with those eval settings holds them out."""
    load_plugins(plugins)
    known = ", ".join([*list_domains(), *(f"bundled:{n}" for n in BUNDLED_DATA)])
    if not names:
        raise ScoreError(f"--domains: name at least one domain (known: {known}), or give --recipe")
    unknown = [n for n in names if not n.startswith("bundled:") and n not in list_domains()]
    if unknown:
        raise ScoreError(f"--domains: unknown domain {unknown[0]!r}; known domains: {known}"
                         " (a plugin's domains need --plugin FILE; a recipe's data domains need --recipe)")
    domains = [bundled_data_domain(n, settings or EvalSettings()) if n.startswith("bundled:") else get_domain(n)
               for n in names]
    if len({d.name for d in domains}) < len(domains):
        twice = next(d.name for i, d in enumerate(domains) if d.name in {e.name for e in domains[:i]})
        raise ScoreError(f"--domains: two entries are named {twice!r}")
    return domains


def find_recipe(recipe: Path) -> Path:
    """A recipe path, or a bundled recipe's name (as `mopd run` takes it)."""
    return bundled_recipe(str(recipe)) if not recipe.exists() and bundled_recipe(str(recipe)).exists() else recipe


def plan_eval(domains: str | None, recipe: Path | None, plugins: list[Path] | None = None,
              chat_template: str | None = None, **options: int | None) -> EvalPlan:
    """What to score, from the command's options (`options`: size, max_new_tokens, batch_size, seed; None: the
    recipe's, else the default). Every mistake is a ScoreError line, raised before any model is loaded.

    With `recipe`, its domains come from `recipe.load.load_recipe` (its models' tokenizers and Hub ids are not
    checked: nothing of them is used here), and `domains` must name some of them."""
    if recipe is None:
        settings = eval_settings(**options)
        return EvalPlan(resolve_domains(parse_names(domains or ""), plugins, settings), settings,
                        chat_template or "auto", max_new_tokens=options.get("max_new_tokens"))
    from ..recipe.load import load_recipe

    load_plugins(plugins)
    try:
        loaded = load_recipe(find_recipe(recipe), check_tokenizers=False, check_hub=False)
    except RecipeError as e:
        raise ScoreError(str(e)) from None
    r = loaded.recipe
    names = parse_names(domains) if domains is not None else list(r.domains)
    if not names:
        raise ScoreError(f"--domains: name at least one of the recipe's domains ({', '.join(r.domains)})")
    if missing := [n for n in names if n not in loaded.domains]:
        raise ScoreError(f"--domains: {missing[0]!r} is not a domain of recipe {r.name!r} ({loaded.path}); its "
                         f"domains: {', '.join(r.domains)}")
    return EvalPlan([loaded.domains[n] for n in names], eval_settings(r.eval, **options),
                    chat_template or r.chat_template, dict(r.chat_template_kwargs), options.get("max_new_tokens"))


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ScoreError(f"{model_dir}: not a directory (give a Hugging Face checkpoint directory)")
    if not (model_dir / "config.json").is_file():
        raise ScoreError(f"{model_dir}: no config.json, so not a Hugging Face checkpoint directory")


def score_checkpoint(model_dir: Path, plan: EvalPlan, records: list[dict[str, Any]] | None = None,
                     ) -> dict[str, dict[str, float]]:
    """{domain: {"score", "accuracy"}} of the checkpoint in `model_dir` (float32, CPU) on `plan`'s domains, as
    `eval.evaluate`; each prompt's transcript is appended to `records` when given (`eval.transcripts`)."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    try:
        tokenizer = with_pad_token(load_tokenizer(model_dir))
        model = load_model(model_dir).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ScoreError(f"{model_dir}: cannot load the checkpoint ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        fmt = prompt_format(tokenizer, plan.chat_template, plan.template_kwargs)
    except ValueError as e:
        raise ScoreError(f"--chat-template: {e}") from None
    def keep(batch) -> None:
        if records is not None:
            records.extend(transcripts(batch, tokenizer, step=0, kind="eval"))

    return evaluate(model, tokenizer, plan.domains, plan.settings, fmt, max_new_tokens=plan.max_new_tokens,
                    on_batch=keep)


def eval_settings(base: EvalSettings | None = None, **kwargs: Any) -> EvalSettings:
    """`EvalSettings` from the command's options (None: `base`'s value, else the default), with a bad value as one
    line."""
    try:
        given = {k: v for k, v in kwargs.items() if v is not None}
        return EvalSettings(**{**(base.model_dump() if base is not None else {}), **given})
    except ValidationError as e:
        first = e.errors()[0]
        option = "--" + "-".join(str(x) for x in first["loc"]).replace("_", "-")
        raise ScoreError(f"{option}: {first['msg']}") from None


def scores_table(model_dir: Path, results: dict[str, dict[str, float]],
                 lengths: dict[str, int] | None = None) -> Table:
    """The scores, one row per domain (and their mean); `lengths`: each domain's generation length, a column."""
    table = Table(title=escape(f"{model_dir}"), title_justify="left")
    table.add_column("domain")
    table.add_column("score", justify="right")
    table.add_column("accuracy", justify="right")
    if lengths:
        table.add_column("max new tokens", justify="right")
    for domain, v in results.items():
        table.add_row(escape(domain), f"{v['score']:.3f}", f"{v['accuracy']:.3f}",
                      *([str(lengths.get(domain, ""))] if lengths else []))
    if len(results) > 1:
        mean = {k: sum(v[k] for v in results.values()) / len(results) for k in ("score", "accuracy")}
        table.add_row("[bold]mean", f"{mean['score']:.3f}", f"{mean['accuracy']:.3f}", *([""] if lengths else []))
    return table


def scores_json(model_dir: Path, settings: EvalSettings, results: dict[str, dict[str, float]],
                lengths: dict[str, int] | None = None) -> dict[str, Any]:
    values = list(results.values())
    return {
        "model": str(Path(model_dir).resolve()),
        "eval": settings.model_dump(),
        "domains": results,
        "mean_score": sum(v["score"] for v in values) / len(values) if values else math.nan,
        **({"max_new_tokens": lengths} if lengths is not None else {}),  # each domain's, as decoded
    }


def write_scores(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def transcripts_path(out: Path) -> Path:
    """Where `mopd eval --out scores.json` writes the transcripts: scores.transcripts.jsonl beside it."""
    return out.with_name(f"{out.stem}.transcripts.jsonl")


def shown(records: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """`--show K`: K transcripts taken in turn from each domain (its held-out order), so every domain shows."""
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_domain.setdefault(r["domain"], []).append(r)
    out: list[dict[str, Any]] = []
    for i in range(max((len(v) for v in by_domain.values()), default=0)):
        out += [v[i] for v in by_domain.values() if i < len(v)]
    return out[:k]


def eval_command(console: Console, model_dir: Path, out: Path | None, domains: str | None, recipe: Path | None,
                 plugins: list[Path], chat_template: str | None, show: int = 0, **options: int | None) -> None:
    """`mopd eval`: check the directory and plan the evaluation (each mistake a ScoreError line, before any
    compute), score, print the table and `show` transcripts and, with `out`, write the JSON and the
    transcripts (`transcripts_path`)."""
    if show < 0:
        raise ScoreError(f"--show {show}: the number of transcripts to print, 0 or more")
    check_model_dir(model_dir)
    plan = plan_eval(domains, recipe, plugins, chat_template, **options)
    records: list[dict[str, Any]] = []
    results = score_checkpoint(model_dir, plan, records)
    console.print(scores_table(model_dir, results, plan.lengths()))
    for record in shown(records, show):
        console.print(escape(render(record)) + "\n", highlight=False, soft_wrap=True)
    if out is not None:
        write_scores(out, scores_json(model_dir, plan.settings, results, plan.lengths()))
        write_transcripts(transcripts_path(out), records)
        console.print(f"scores: {out}; transcripts: {transcripts_path(out)}", highlight=False, soft_wrap=True,
                      markup=False)


__all__ = ["BUNDLED_DATA", "BUNDLED_MAX_NEW_TOKENS", "EvalPlan", "ScoreError", "check_model_dir", "eval_command", "eval_settings", "plan_eval", "resolve_domains",
           "score_checkpoint", "scores_json", "scores_table", "shown", "transcripts_path", "write_scores"]
