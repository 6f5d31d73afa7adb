"""`mopd eval`: score any Hugging Face checkpoint directory on any registered domains, as a stage's eval would.

Why: comparing a checkpoint from elsewhere (or one from an old run) with a recipe's models should not need a
recipe with an `eval` stage. This is the same held-out evaluation (`eval.evaluate`: each domain's fixed eval set,
greedy decoding, its verifier) with the checkpoint's own tokenizer and prompt rendering.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.table import Table

from ..core.schema import EvalSettings
from ..envs import DomainLike, get_domain, list_domains, load_plugin
from ..eval.evaluate import evaluate
from ..models.checkpoint import load_model, load_tokenizer
from ..models.prompting import prompt_format, with_pad_token


class ScoreError(ValueError):
    """A mistake in what `mopd eval` was asked, as one line (exit status 2)."""


def parse_names(text: str) -> list[str]:
    """`a,b, c` -> [a, b, c], without empty entries or repeats."""
    return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def resolve_domains(names: list[str], plugins: list[Path] | None = None) -> list[DomainLike]:
    """Each named domain from the registry, after `plugins` have registered theirs."""
    for plugin in plugins or []:
        try:
            load_plugin(plugin)
        except Exception as e:  # a user's file: any failure is theirs to read, in one line
            raise ScoreError(f"plugin {plugin}: {e.__class__.__name__}: {e}") from None
    if not names:
        raise ScoreError("--domains: name at least one domain (known: " + ", ".join(list_domains()) + ")")
    unknown = [n for n in names if n not in list_domains()]
    if unknown:
        raise ScoreError(f"--domains: unknown domain {unknown[0]!r}; known domains: {', '.join(list_domains())}"
                         " (a plugin's domains need --plugin FILE)")
    return [get_domain(n) for n in names]


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ScoreError(f"{model_dir}: not a directory (give a Hugging Face checkpoint directory)")
    if not (model_dir / "config.json").is_file():
        raise ScoreError(f"{model_dir}: no config.json, so not a Hugging Face checkpoint directory")


def score_checkpoint(model_dir: Path, domains: list[DomainLike], settings: EvalSettings,
                     chat_template: str = "auto") -> dict[str, dict[str, float]]:
    """{domain: {"score", "accuracy"}} of the checkpoint in `model_dir` (float32, CPU), as `eval.evaluate`."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    try:
        tokenizer = with_pad_token(load_tokenizer(model_dir))
        model = load_model(model_dir).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ScoreError(f"{model_dir}: cannot load the checkpoint ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        fmt = prompt_format(tokenizer, chat_template)
    except ValueError as e:
        raise ScoreError(f"--chat-template: {e}") from None
    return evaluate(model, tokenizer, domains, settings, fmt)


def eval_settings(**kwargs: Any) -> EvalSettings:
    """`EvalSettings` from the command's options (None: the default), with a bad value as one line."""
    try:
        return EvalSettings(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        option = "--" + "-".join(str(x) for x in first["loc"]).replace("_", "-")
        raise ScoreError(f"{option}: {first['msg']}") from None


def scores_table(model_dir: Path, results: dict[str, dict[str, float]]) -> Table:
    table = Table(title=f"{model_dir}", title_justify="left")
    table.add_column("domain")
    table.add_column("score", justify="right")
    table.add_column("accuracy", justify="right")
    for domain, v in results.items():
        table.add_row(domain, f"{v['score']:.3f}", f"{v['accuracy']:.3f}")
    if len(results) > 1:
        mean = {k: sum(v[k] for v in results.values()) / len(results) for k in ("score", "accuracy")}
        table.add_row("[bold]mean", f"{mean['score']:.3f}", f"{mean['accuracy']:.3f}")
    return table


def scores_json(model_dir: Path, settings: EvalSettings, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    values = list(results.values())
    return {
        "model": str(Path(model_dir).resolve()),
        "eval": settings.model_dump(),
        "domains": results,
        "mean_score": sum(v["score"] for v in values) / len(values) if values else math.nan,
    }


def write_scores(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


__all__ = ["ScoreError", "eval_settings", "resolve_domains", "score_checkpoint", "scores_json",
           "scores_table", "write_scores"]
