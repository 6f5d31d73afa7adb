"""Recipe variants: the same recipe with some settings replaced (a sweep point) and/or another seed, each
written as a YAML file, checked by the recipe loader, and run into its own run directory.

Why files and not in-memory edits: every variant passes exactly the checks a hand-written recipe passes
(`load_recipe`), and its run directory holds the recipe that produced it. A variant is written away from the
original recipe's folder, so relative paths in it (plugins, data files, model directories) are made absolute
first; a recipe without such paths is written unchanged except for the overridden keys, so its stages keep
their identities.

How variants share work: each variant runs in its own run directory (`RUN/seed-<s>/`, `RUN/<point>/...`),
and before it runs, every stage whose identity (`recipe.identity`: settings, seed and parents' identities)
equals a finished stage of another variant of the same invocation is linked to it (a relative symlink), so the
runner finds it finished and skips it. Points of a sweep differ only in the swept stage: the parents they share
are trained once. Seeds differ in `seed`, so stages that pin their own `seed:` are shared across seeds and all
others are not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import RecipeError
from ..core.run_dir import FINAL, RECIPE_COPY, RUN_JSON
from ..core.schema import Recipe
from ..core.schema.bounds import SEEDS_MAX
from ..models.checkpoint import read_lineage
from ..recipe.identity import stage_identities
from ..recipe.load import LoadedRecipe, load_recipe
from ..recipe.refs import resolve_external, stage_refs

RESERVED_KEYS = {"seed": "use --seeds (seeds are base seed + 0, 1, ...)", "seeds": "use --seeds",
                 "name": "a variant keeps its recipe's name"}


@dataclass
class Variant:
    """One recipe variant: its run directory, the settings it overrides, its seed, and the loaded recipe."""

    name: str  # the point's name ("" for a plain seed variant)
    settings: dict[str, Any]  # dotted key -> value, as the recipe reads it
    seed: int
    out: Path
    loaded: LoadedRecipe
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # dotted key -> value as typed


def parse_value(text: str) -> Any:
    """A value as typed: an integer, a float (`1e-4` too, which YAML reads as text), else YAML (true, null, a
    list, a string)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text) if text.strip() else text


def parse_assignment(text: str) -> tuple[str, list[str]]:
    """`stage.key=v1,v2` -> ("stage.key", ["v1", "v2"]) (the values as typed; `parse_value` reads them); a
    missing `=`, an empty key or value, or a value listed twice is a RecipeError."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text}: expected KEY=VALUE[,VALUE...], e.g. student.lr=1e-4,3e-4")
    parts = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not p for p in parts):
        raise RecipeError(f"--set {text}: empty value (give one or more comma-separated values)")
    if len(set(parts)) != len(parts):
        raise RecipeError(f"--set {text}: a value is listed twice")
    return key, parts


def parse_grid(assignments: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Every `--set` of a sweep; at least one, each key once."""
    if not assignments:
        raise RecipeError("mopd sweep: give at least one --set KEY=VALUE[,VALUE...]")
    grid = [parse_assignment(a) for a in assignments]
    keys = [k for k, _ in grid]
    if dup := next((k for k in keys if keys.count(k) > 1), None):
        raise RecipeError(f"--set {dup}: the key is set twice; list all its values in one --set")
    return grid


def key_path(raw: dict[str, Any], key: str) -> tuple[str, ...]:
    """Where a dotted key lives in the recipe: `stage.k[.k2]` (the first part names a stage) or a top-level
    `k[.k2]`; anything else is a RecipeError naming the key."""
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise RecipeError(f"--set {key}: empty part in the dotted key")
    if parts[0] in RESERVED_KEYS:
        raise RecipeError(f"--set {key}: cannot be swept ({RESERVED_KEYS[parts[0]]})")
    stages = raw.get("stages") or {}
    if parts[0] in stages:
        if len(parts) == 1:
            raise RecipeError(f"--set {key}: names a stage; name one of its settings, e.g. {key}.lr")
        return ("stages", *parts)
    if parts[0] in Recipe.model_fields and parts[0] != "stages":
        return parts
    raise RecipeError(f"--set {key}: {parts[0]!r} is neither a stage ({', '.join(stages)}) nor a top-level "
                      "recipe key")


def set_key(raw: dict[str, Any], path: tuple[str, ...], value: Any, key: str) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {key}: {'.'.join(path[1 if path[0] == 'stages' else 0: i + 1])} is not "
                              "a mapping")
        node = nxt
    node[path[-1]] = value


def portable(raw: dict[str, Any], loaded: LoadedRecipe) -> dict[str, Any]:
    """`raw` with every relative local path made absolute (plugins, data files, model directories), so the
    variant means the same wherever it is written."""
    base = loaded.path.parent
    out = copy.deepcopy(raw)
    out["plugins"] = [str((base / p).resolve()) if not Path(p).is_absolute() else p for p in raw.get("plugins", [])]
    if not out["plugins"]:
        del out["plugins"]
    for entry in out.get("domains", []):
        if isinstance(entry, dict) and isinstance(src := entry.get("source"), str) and not Path(src).is_absolute() \
                and not src.startswith("bundled:") and (base / src).exists():
            entry["source"] = str((base / src).resolve())
    for name, stage in loaded.recipe.stages.items():
        for key, ref in stage_refs(stage):
            if ref not in loaded.recipe.stages and not Path(ref).is_absolute() and (base / ref).is_dir():
                node = out["stages"][name]
                for k in key[:-1]:
                    node = node[k]
                node[key[-1]] = resolve_external(ref, base)
    return out


def _slug(point: dict[str, str]) -> str:
    """A point's directory name: `key=value` pairs as typed, joined by `__`."""
    name = "__".join(f"{k}={t}" for k, t in point.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", name) or "base"


def _load_variant(raw: dict[str, Any], tmp: Path, label: str) -> LoadedRecipe:
    path = tmp / f"{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        return load_recipe(path)
    except RecipeError as e:
        why = re.sub(rf"^{re.escape(str(path))}(:\d+)?: ", "", str(e))
        raise RecipeError(f"{label}: {why}") from None


def plan_variants(loaded: LoadedRecipe, out: Path, seeds: int,
                  grid: Sequence[tuple[str, list[str]]] = ()) -> list[Variant]:
    """Every variant (each grid point x each seed), each checked by the loader, before anything runs or is
    written under `out`; each has `loaded`'s trackers (the file's `logging:` and the command's `--log`). `grid`: (dotted key, values as typed). Seeds are the recipe's `seed` + 0 .. seeds-1;
    with one seed there is no seed-<s> level; with no grid there is no point level."""
    if not 1 <= seeds <= SEEDS_MAX:
        raise RecipeError(f"--seeds {seeds}: must be from 1 to {SEEDS_MAX} (each seed is a whole run of every method)")
    raw0 = portable(yaml.safe_load(loaded.path.read_text()), loaded)
    raw0.pop("seeds", None)
    # the trackers as the command resolved them (`--log` adds to the file's `logging:`), so every variant logs
    logging = loaded.recipe.logging.model_dump(mode="json", exclude_defaults=True)
    if logging:
        raw0["logging"] = logging
    else:
        raw0.pop("logging", None)
    base_seed = loaded.recipe.seed
    paths = {key: key_path(raw0, key) for key, _ in grid}
    points: list[dict[str, str]] = [{}]
    for key, texts in grid:
        points = [{**p, key: t} for p in points for t in texts]
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for point in points:
            settings = {k: parse_value(t) for k, t in point.items()}
            name = _slug(point) if grid else ""
            label = ", ".join(f"--set {k}={t}" for k, t in point.items()) or str(loaded.path)
            for s in range(base_seed, base_seed + seeds):
                raw = copy.deepcopy(raw0)
                for key, value in settings.items():
                    set_key(raw, paths[key], value, key)
                raw["seed"] = s
                where = Path(out) / name if name else Path(out)
                where = where / f"seed-{s}" if seeds > 1 else where
                variants.append(Variant(name, settings, s, where, _load_variant(raw, Path(tmp), label), raw, point))
    return variants


def place(variant: Variant) -> Variant:
    """Write the variant's recipe into its run directory (the loaded recipe then points there)."""
    variant.out.mkdir(parents=True, exist_ok=True)
    path = variant.out / RECIPE_COPY
    path.write_text(yaml.safe_dump(variant.raw, sort_keys=False))
    variant.loaded = dataclasses.replace(variant.loaded, path=path)
    return variant


def finished_stages(dirs: Sequence[Path]) -> dict[str, Path]:
    """identity -> the real directory of a finished stage (final/ with a lineage naming it) under `dirs`."""
    found: dict[str, Path] = {}
    for d in dirs:
        for lineage in sorted(Path(d).glob(f"*/{FINAL}/mopd.json")):
            stage_dir = lineage.parent.parent
            try:
                identity = read_lineage(lineage.parent).get("identity")
            except (OSError, ValueError):
                continue
            if isinstance(identity, str) and not stage_dir.is_symlink():
                found.setdefault(identity, stage_dir.resolve())
    return found


def _linked_identity(link: Path) -> str | None:
    try:
        return read_lineage(link / FINAL).get("identity")
    except (OSError, ValueError):
        return None


def link_shared_stages(variant: Variant, finished: dict[str, Path]) -> list[str]:
    """Link each stage of the variant that is not yet in its run directory to a finished stage with the same
    identity; returns the linked stage names. A stage directory already there is left to the runner; a link
    that no longer leads to this identity (the recipe changed since) is only a link: it is replaced."""
    ids = stage_identities(variant.loaded)
    linked = []
    for name in variant.loaded.order:
        target = variant.out / name
        source = finished.get(ids[name])
        if source is None or source == target.resolve():
            continue
        if target.is_symlink() and _linked_identity(target) != ids[name]:
            target.unlink()
        if target.exists() or target.is_symlink():
            continue
        target.symlink_to(os.path.relpath(source, variant.out), target_is_directory=True)
        linked.append(name)
    return linked


RunFn = Callable[[LoadedRecipe, Path], Any]  # runs one variant's recipe into its run directory


@dataclass
class VariantRuns:
    """What an executor runs: the variants in order, for each the earlier variants it must wait for
    (`variant_waits`) and the stage identities it shares with them (`needs`: once each is `finished()`, it need
    not wait any longer), `prepare` (on the driver, just before a variant starts: its recipe written and its
    shared stages linked) and `run` (the recipe run itself; with the Ray executor, in a worker)."""

    variants: list[Variant]
    waits: list[set[int]]
    needs: list[set[str]]
    finished: Callable[[], set[str]]
    prepare: Callable[[Variant], None]
    run: RunFn


Executor = Callable[[VariantRuns], list[Any]]  # returns each variant's `run` result, in variant order


def run_in_order(runs: VariantRuns) -> list[Any]:
    """The local executor: one variant after another, each reusing what the earlier ones finished (an order in
    which every wait is already met). The Ray executor (`variants_ray`) starts each as soon as its waits are met."""
    results = []
    for v in runs.variants:
        runs.prepare(v)
        results.append(runs.run(v.loaded, v.out))
    return results


def variant_waits(variants: Sequence[Variant], finished: Collection[str]) -> tuple[list[set[int]], list[set[str]]]:
    """For each variant, the earlier variants that first reach a stage identity it also has and that no earlier
    run `finished`, and those identities: a parallel executor starts it only once they are finished (or those
    variants are), so the shared stage trains once and is linked. A sweep point waits for its seed's first
    point's parents, seeds only for stages that pin their own `seed:`."""
    owner: dict[str, int] = {}
    waits, needs = [], []
    for i, v in enumerate(variants):
        ids = set(stage_identities(v.loaded).values()) - set(finished)
        shared = {x for x in ids if x in owner}
        waits.append({owner[x] for x in shared})
        needs.append(shared)
        for x in ids:
            owner.setdefault(x, i)
    return waits, needs


def recorded_stages(dirs: Sequence[Path]) -> set[str]:
    """Identities of the stages that the run.json of `dirs` record as done (a runner rewrites it after each
    stage, once the stage's final checkpoint and metrics are complete); unreadable files count as none."""
    done: set[str] = set()
    for d in dirs:
        try:
            stages = json.loads((Path(d) / RUN_JSON).read_text(encoding="utf-8")).get("stages", {})
        except (OSError, ValueError, AttributeError):
            continue
        done |= {s["identity"] for s in stages.values() if isinstance(s, dict) and isinstance(s.get("identity"), str)
                 and s.get("status") in ("ran", "cached")}
    return done


def point_settings(name: str) -> dict[str, str]:
    """A point directory's settings read back from its name (`_slug`): `key=value` pairs joined by `__`, each
    value as typed except for characters a file name may not hold (written `-`)."""
    pairs = [part.split("=", 1) for part in name.split("__")]
    return {k: v for k, v in (pair for pair in pairs if len(pair) == 2 and pair[0])}


def _seed_number(path: Path) -> int:
    suffix = path.name.removeprefix("seed-")
    return int(suffix) if suffix.isdigit() else -1


def sweep_points(root: Path) -> dict[str, list[Path]]:
    """Every sweep point any invocation left under `root`, by name, with its run directories: RUN/<point>/ (one
    seed) or RUN/<point>/seed-<s>/ in seed order. A point is a real directory whose name holds `key=value`
    settings; links, seed-only directories (`compare --seeds`) and directories without a run are skipped."""
    points: dict[str, list[Path]] = {}
    root = Path(root)
    if not root.is_dir():
        return points
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir() or not point_settings(d.name):
            continue
        seeds = sorted((r.parent for r in d.glob("seed-*/run.json") if not r.parent.is_symlink()), key=_seed_number)
        runs = seeds or ([d] if (d / RUN_JSON).is_file() else [])
        if runs:
            points[d.name] = runs
    return points


def earlier_runs(root: Path) -> list[Path]:
    """The run directories an earlier sweep or seeds invocation left under `root` (RUN/seed-<s>/, RUN/<point>/,
    RUN/<point>/seed-<s>/): a sweep rerun with new values reuses their finished stages of equal identity."""
    root = Path(root)
    return sorted({p.parent for p in (*root.glob("*/run.json"), *root.glob("*/*/run.json"))
                   if not p.parent.is_symlink()})


def run_variants(variants: Sequence[Variant], run: RunFn, executor: Executor = run_in_order,
                 earlier: Sequence[Path] = ()) -> list[Any]:
    """Place each variant, link the stages it shares with finished stages of the others (and of the run
    directories `earlier`), and run it with `run` through `executor`; returns each variant's `run` result."""
    dirs = sorted({v.out for v in variants} | {Path(d) for d in earlier})

    def prepare(v: Variant) -> None:
        place(v)
        link_shared_stages(v, finished_stages([d for d in dirs if d.exists()]))

    waits, needs = variant_waits(variants, finished_stages([d for d in dirs if d.exists()]))
    outs = [v.out for v in variants]

    def done() -> set[str]:  # recorded by a runner and with its final checkpoint in place
        return recorded_stages(outs) & set(finished_stages([d for d in outs if d.exists()]))

    return executor(VariantRuns(list(variants), waits, needs, done, prepare, run))
