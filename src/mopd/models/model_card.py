"""A Hugging Face model card (README.md) for a checkpoint directory, built from its `mopd.json` lineage.

Why: every final checkpoint is an ordinary Hugging Face directory, and a Hub (or anyone opening the folder)
reads README.md first. With the card written by `huggingface_hub.ModelCard` the directory uploads as it is:
the metadata block names the base model, the stage kind and domains as tags, and the held-out scores in the
model-index format (`EvalResult`), so the Hub shows them; the body states the lineage and the stage's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_FILE = "README.md"
EVAL_SOURCE = "mopd held-out evaluation (greedy decoding, each domain's verifier)"
# the score keys `eval.evaluate` writes, with what each one is
SCORE_METRICS = {"score": "mean verifier reward", "accuracy": "exact-match accuracy"}


def domain_scores(eval_scores: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The {domain: {"score", "accuracy"}} entries of an eval dict; anything else (nested per-model dicts of an
    eval stage, non-numbers) is left out."""
    out: dict[str, dict[str, float]] = {}
    for domain, values in (eval_scores or {}).items():
        if isinstance(values, dict):
            nums = {k: float(v) for k, v in values.items()
                    if k in SCORE_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if nums:
                out[str(domain)] = nums
    return out


def _domains(lineage: dict[str, Any], scores: dict[str, dict[str, float]]) -> list[str]:
    settings = lineage.get("settings") or {}
    named = settings.get("domains") if isinstance(settings, dict) else None
    teachers = lineage.get("teachers") or {}
    return sorted(set(named or []) | set(scores) | set(teachers))


def eval_results(scores: dict[str, dict[str, float]]) -> list[EvalResult]:
    """One model-index entry per (domain, metric)."""
    return [
        EvalResult(task_type="text-generation", task_name="verifiable generation",
                   dataset_type=f"mopd/{domain}", dataset_name=domain, dataset_split="held-out",
                   metric_type=metric, metric_name=SCORE_METRICS[metric], metric_value=value)
        for domain, values in sorted(scores.items())
        for metric, value in sorted(values.items())
    ]


def card_data(lineage: dict[str, Any], scores: dict[str, dict[str, float]]) -> ModelCardData:
    """The card's YAML metadata: base model (the init stage or checkpoint the stage started from), tags (mopd,
    the stage kind, one per domain), domains as datasets, and the eval results."""
    name = str(lineage.get("stage", "model"))
    kind = str(lineage.get("kind", "unknown"))
    domains = _domains(lineage, scores)
    base = lineage.get("init_stage") or lineage.get("init")
    return ModelCardData(
        model_name=name,
        base_model=str(base) if base else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["mopd", f"stage-{kind}", *(f"domain-{d}" for d in domains)],
        datasets=domains or None,
        eval_results=eval_results(scores) or None,
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v, sort_keys=True) + "`"
    return "`—`" if v is None else str(v).replace("|", "\\|")


def card_body(lineage: dict[str, Any], scores: dict[str, dict[str, float]],
              train_metrics: dict[str, Any] | None = None) -> str:
    """Markdown: what the checkpoint is, its held-out scores, its lineage and its final metrics."""
    name, kind = lineage.get("stage", "model"), lineage.get("kind", "unknown")
    source = lineage.get("source") or {}
    what = (f"Converted by `mopd convert` from the GGUF file `{source.get('gguf')}` (sha256 {source.get('sha256')}, "
            f"architecture `{source.get('architecture')}`): its weights dequantized to float32, its tokenizer and "
            "chat template as the file declares them. No training." if kind == "gguf_convert" else
            f"A `{kind}` stage of a mopd recipe: its `init` model unchanged (no training), with its held-out scores"
            + (" measured after the system prompt and examples in `teacher_prompt.json`: a prompted teacher."
               if kind == "prompted" else ".") if kind in ("model", "prompted") else
            f"A `{kind}` stage checkpoint trained with mopd (multi-teacher on-policy distillation).")
    parts = [f"# {name}",
             f"{what} It is a plain Hugging Face directory: `AutoModelForCausalLM.from_pretrained(this_dir)`."]
    if scores:
        metrics = sorted({m for v in scores.values() for m in v})
        rows = [[d, *(_value(scores[d].get(m)) for m in metrics)] for d in sorted(scores)]
        parts += ["## Held-out evaluation", f"{EVAL_SOURCE}.", _table(["domain", *metrics], rows)]
    keys = ("stage", "kind", "identity", "init_stage", "init", "parents", "teachers", "seed", "step", "version")
    parts += ["## Lineage", "From `mopd.json` beside this card (which also holds the stage's full settings).",
              _table(["field", "value"], [[k, _value(lineage.get(k))] for k in keys if k in lineage])]
    final = {k: v for k, v in (lineage.get("metrics") or {}).items() if k != "eval"}
    final.update(train_metrics or {})
    if final:
        parts += ["## Final metrics", _table(["metric", "value"], [[k, _value(v)] for k, v in sorted(final.items())])]
    settings = lineage.get("settings")
    if settings:
        parts += ["## Settings", "```json\n" + json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n```"]
    return "\n\n".join(parts) + "\n"


def model_card(lineage: dict[str, Any], eval_scores: dict[str, Any] | None = None,
               train_metrics: dict[str, Any] | None = None) -> ModelCard:
    """The card for a checkpoint with this lineage; `eval_scores` default to the lineage's `metrics.eval`."""
    if eval_scores is None:
        eval_scores = (lineage.get("metrics") or {}).get("eval")
    scores = domain_scores(eval_scores)
    data = card_data(lineage, scores)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(lineage, scores, train_metrics)}")


def write_model_card(checkpoint_dir: str | Path, lineage: dict[str, Any],
                     eval_scores: dict[str, Any] | None = None,
                     train_metrics: dict[str, Any] | None = None) -> Path:
    """Write `checkpoint_dir/README.md` (see `model_card`); returns its path."""
    path = Path(checkpoint_dir) / CARD_FILE
    model_card(lineage, eval_scores, train_metrics).save(path)
    return path
