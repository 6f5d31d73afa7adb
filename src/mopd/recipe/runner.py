"""Run a recipe's stage DAG: skip what is finished, resume what was interrupted, record lineage, report.

A stage's identity is the hash of its settings and its parents' identities, so a rerun skips finished stages,
and changing one teacher reruns only what depends on it. A stage directory whose identity no longer matches is
moved aside to `.superseded/` (never deleted), so nothing already saved is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..models.checkpoint import read_lineage, write_json_atomic
from ..stages.context import StageContext
from ..stages.placement import stage_tokenizer
from ..stages.run import run_stage
from ..stages.train import FINAL, checkpointed_seconds
from .build import recipe_tokenizer
from .load import LoadedRecipe, _refs, _resolve_external, init_ref
from .resources import precision_warnings
from .schema import EvalStage, MOPDStage

# they change logging (and the MOPD preflight check), or how a step's gradient is computed (micro-batches: the same
# gradient up to float rounding), not what is trained
SETTINGS_NOT_IN_IDENTITY = {"checkpoint_every", "eval_every", "preflight", "micro_batch_size"}


def stage_identities(loaded: LoadedRecipe) -> dict[str, str]:
    recipe = loaded.recipe
    ids: dict[str, str] = {}
    for name in loaded.order:
        stage = recipe.stages[name]
        settings = stage.model_dump(mode="json", exclude=SETTINGS_NOT_IN_IDENTITY)
        parents = {
            ref: ids.get(ref) or f"external:{_resolve_external(ref, loaded.path.parent) or ref}"
            for _, ref in _refs(stage)
        }
        payload = {
            "settings": settings,
            "seed": getattr(stage, "seed", None) if getattr(stage, "seed", None) is not None else recipe.seed,
            "domains": getattr(stage, "domains", None) or recipe.domains,
            "eval": recipe.eval.model_dump(mode="json"),
            "tokenizer": recipe.tokenizer.model_dump(mode="json"),
            "parents": parents,
        }
        payload.update(_real_model_identity(recipe, settings))
        ids[name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return ids


def _real_model_identity(recipe, settings: dict) -> dict:
    """Identity entries of the real-model settings (data domains, prompt rendering, precision, master weights,
    LoRA).

    Only what differs from the defaults is added, and `device` never is (where a stage runs does not define it),
    so recipes that use none of these keep the identities their finished stages were saved under.
    """
    for key in ("dtype", "master_weights", "lora", "device"):
        if settings.get(key) is None or key == "device":
            settings.pop(key, None)
    extra: dict = {}
    if recipe.data_domains:
        extra["data_domains"] = [d.model_dump(mode="json") for d in recipe.data_domains.values()]
    rendering = {"chat_template": recipe.chat_template, "chat_template_kwargs": recipe.chat_template_kwargs,
                 "dtype": recipe.dtype}
    if rendering != {"chat_template": "auto", "chat_template_kwargs": {}, "dtype": "auto"}:
        extra["rendering"] = rendering
    if recipe.master_weights != "float32":
        extra["master_weights"] = recipe.master_weights
    return extra


def report_block(loaded: LoadedRecipe) -> dict | None:
    recipe = loaded.recipe
    mopd = [n for n in loaded.order if isinstance(recipe.stages[n], MOPDStage)]
    if not mopd:
        return None
    student = recipe.report.student or mopd[-1]
    s: MOPDStage = recipe.stages[student]
    return {"start": s.init, "student": student, "teachers": dict(s.teachers)}


def _finished(stage_dir: Path, identity: str) -> bool:
    final = stage_dir / FINAL / "mopd.json"
    return final.exists() and read_lineage(stage_dir / FINAL).get("identity") == identity


def _archive_if_stale(stage_dir: Path, identity: str, out: Path) -> None:
    marker = stage_dir / "stage.json"
    if not stage_dir.exists():
        return
    old = json.loads(marker.read_text()).get("identity", "unknown") if marker.exists() else "unknown"
    if old != identity:
        dest = out / ".superseded" / f"{stage_dir.name}-{old}-{int(time.time())}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage_dir, dest)


def run_recipe(loaded: LoadedRecipe, out: Path, console: Console | None = None) -> dict | None:
    """Run every stage in dependency order; returns the summary (None if the recipe has no mopd stage)."""
    console = console or Console()
    recipe = loaded.recipe
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = stage_identities(loaded)
    tokenizer = recipe_tokenizer(recipe)
    refs: dict[str, str] = {}  # stage name or external reference -> loadable path / hub id
    run_path = out / "run.json"
    previous = json.loads(run_path.read_text()) if run_path.exists() else {}
    stages_info: dict[str, dict] = {}
    start_time = time.time()

    def write_run_json() -> None:
        write_json_atomic(run_path, {
            "recipe": recipe.name,
            "recipe_path": str(loaded.path.resolve()),
            "seed": recipe.seed,
            "version": __version__,
            "wall_seconds": round(sum(v.get("wall_seconds", 0.0) for v in stages_info.values()), 2),
            "order": loaded.order,
            "stages": stages_info,
            "report": report_block(loaded),
        })

    # the resolved recipe next to its results, so a run directory says what produced it
    if loaded.path.resolve() != (out / "recipe.yaml").resolve():
        shutil.copyfile(loaded.path, out / "recipe.yaml")

    def warn(msg: str, console: Console = console) -> None:
        console.print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)

    for msg in precision_warnings(recipe):  # before any stage spends compute
        warn(msg)
    with Progress(
        TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as progress:
        for name in loaded.order:
            stage = recipe.stages[name]
            stage_dir = out / name
            for _, ref in _refs(stage):
                if ref not in recipe.stages:
                    refs[ref] = _resolve_external(ref, loaded.path.parent) or ref
            info = {
                "kind": stage.kind,
                "init": init_ref(stage),
                "teachers": dict(teachers) if isinstance(teachers := getattr(stage, "teachers", None), dict) else None,
                "domains": getattr(stage, "domains", None) or recipe.domains,
                "identity": ids[name],
            }
            total = getattr(stage, "steps", 1)
            task = progress.add_task(name, total=total, info="")
            if _finished(stage_dir, ids[name]):
                prior = previous.get("stages", {}).get(name, {})
                info["wall_seconds"] = prior.get("wall_seconds", 0.0) if prior.get("identity") == ids[name] else 0.0
                info["status"] = "cached"
                progress.update(task, completed=total, info="[dim]finished earlier (same identity): skipped")
            else:
                _archive_if_stale(stage_dir, ids[name], out)
                stage_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(stage_dir / "stage.json", {"identity": ids[name], "kind": stage.kind})
                seed = getattr(stage, "seed", None)
                ctx = StageContext(
                    name=name, settings=stage, recipe=recipe, stage_dir=stage_dir, identity=ids[name],
                    seed=recipe.seed if seed is None else seed,
                    tokenizer=stage_tokenizer(recipe, tokenizer, refs.get(init_ref(stage) or "")),
                    init_path=refs.get(init_ref(stage) or ""),
                    model_refs=dict(refs), parents={r: ids.get(r, refs.get(r, r)) for _, r in _refs(stage)},
                    on_progress=lambda step, tot, m, task=task: progress.update(
                        task, completed=step, info=_progress_info(m)),
                    on_warning=lambda msg: warn(msg, progress.console),
                )
                t0 = time.time() - checkpointed_seconds(stage_dir)  # an interrupted stage's earlier time counts
                run_stage(ctx)
                info["wall_seconds"] = round(time.time() - t0, 2)
                info["status"] = "ran"
                progress.update(task, completed=total)
            if not isinstance(stage, EvalStage):
                refs[name] = str(stage_dir / FINAL)
            stages_info[name] = info
            write_run_json()

    console.print(f"ran {recipe.name} in {time.time() - start_time:.1f}s -> {out}")
    if report_block(loaded) is None:
        console.print("no mopd stage in this recipe: report skipped")
        return None
    from ..report import build_report

    return build_report(out)


def _progress_info(m: dict[str, float]) -> str:
    parts = []
    for key in ("loss", "reward/mean", "mopd/reverse_kl"):
        if key in m:
            parts.append(f"{key.split('/')[0] if key != 'mopd/reverse_kl' else 'rkl'}={m[key]:.3f}")
    return " ".join(parts)
