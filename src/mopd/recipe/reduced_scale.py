"""A recipe at a reduced scale (`scale:` in the recipe, `mopd run NAME --scale 0.05`): fewer steps, smaller
batches and smaller held-out sets, for the test suite and a quick look at a recipe.

Why one knob in the loader rather than hand-edited copies: a scaled recipe keeps every stage, reference and
method setting of the real one (only sizes shrink), passes every load-time check on its scaled numbers, and
carries its scale into each stage's identity (`recipe.identity`), so a scaled run's stages never pass for the
full recipe's, and `mopd run --scale` writes to its own run directory (`runs/<name>-scale<s>`).

What shrinks, by the factor s (0 < s <= 1), each with a floor so that every stage still does its work:
  steps                      round(steps * s), at least MIN_STEPS (or the stage's own steps, if fewer)
  batch_size                 round(batch_size * s), at least MIN_BATCH (or its own), and so micro_batch_size
  eval.size, eval_size       round(size * s), at least MIN_EVAL (or their own); preflight.prompts likewise
  eval_pairs (reward model)  likewise, at least MIN_EVAL
  warmup_steps, checkpoint_every, eval_every, keep_every, teacher_schedule, steps_per_domain
                             in proportion to the stage's new number of steps (snapshots a teacher no longer
                             keeps at that scale become `final`; a ppo stage's checkpoints stay on whole epochs)
Method settings (group sizes, n, lr, beta, temperatures, model shapes) stay as written.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..core.errors import RecipeError
from ..core.schema import Recipe

MIN_STEPS = 2
MIN_BATCH = 4
MIN_EVAL = 8
MIN_PREFLIGHT = 4


def shrink(n: int, scale: float, floor: int) -> int:
    """`n` scaled by `scale`, never below `floor` (nor above `n`): n itself when it is already that small."""
    return max(min(n, floor), round(n * scale))


def _in_proportion(n: int, ratio: float) -> int:
    """A step count or period inside a stage, kept in proportion to its steps; a positive one stays >= 1."""
    return max(1, round(n * ratio)) if n > 0 else 0


def _cascade(raw: dict[str, Any], steps: int, ratio: float) -> int:
    """Each domain's steps in proportion (>= 1 each); the stage's steps are their sum. Returns the steps."""
    parts = raw.get("steps_per_domain")
    if parts:
        raw["steps_per_domain"] = {d: _in_proportion(n, ratio) for d, n in parts.items()}
        return sum(raw["steps_per_domain"].values())
    return max(steps, len(raw["order"]))


def _schedule(raw: dict[str, Any], ratio: float, before: dict[str, Any], after: dict[str, dict[str, Any]]) -> None:
    """Phase ends in proportion (the last at the stage's steps, ends that meet merged); a snapshot keeps its place
    among the teachers' kept steps (the j-th kept step stays the j-th), or becomes `final` where a teacher no
    longer keeps it. `before` / `after`: every stage unscaled (schema objects) / scaled (dicts)."""
    phases: list[dict[str, Any]] = []
    last = len(raw["teacher_schedule"]) - 1
    for i, phase in enumerate(raw["teacher_schedule"]):
        until = raw["steps"] if i == last else min(raw["steps"], _in_proportion(phase["until_step"], ratio))
        snap = phase["snapshot"]
        if snap != "final":
            snap = _kept_step(snap, [(before.get(t), after.get(t)) for t in raw["teachers"].values()])
        if phases and phases[-1]["until_step"] >= until:
            phases.pop()  # its end met this phase's at this scale
        phases.append({"until_step": until, "snapshot": snap})
    raw["teacher_schedule"] = phases


def _kept_step(step: int, teachers: list[tuple[Any, dict[str, Any] | None]]) -> int | str:
    """The scaled step of the teachers' kept snapshot `step`, the same for every teacher, or `final`."""
    kept = set()
    for old, new in teachers:
        if old is None or new is None or not getattr(old, "keep_every", 0):
            return "final"  # not a stage that keeps snapshots: the loader names the problem as for any recipe
        at = step // old.keep_every * new["keep_every"]
        if not 0 < at < new["steps"]:
            return "final"
        kept.add(at)
    return kept.pop() if len(kept) == 1 else "final"


def _scale_stage(raw: dict[str, Any], scale: float) -> None:
    """One stage's settings (as dumped, every field present) scaled in place."""
    if "steps" not in raw:
        return  # merge, eval: nothing to shrink
    old = raw["steps"]
    steps = shrink(old, scale, MIN_STEPS)
    ratio = steps / old
    if raw.get("kind") == "cascade_rl":
        steps = _cascade(raw, steps, ratio)
    raw["steps"] = steps
    raw["batch_size"] = shrink(raw["batch_size"], scale, MIN_BATCH)
    if isinstance(raw.get("micro_batch_size"), int):
        raw["micro_batch_size"] = min(raw["micro_batch_size"], raw["batch_size"])
    raw["warmup_steps"] = round(raw["warmup_steps"] * ratio)
    for key in ("checkpoint_every", "eval_every", "keep_every"):
        raw[key] = min(_in_proportion(raw[key], ratio), steps)
    if raw.get("epochs", 1) > 1:  # ppo: a checkpoint falls where a fresh rollout starts
        raw["checkpoint_every"] = -(-raw["checkpoint_every"] // raw["epochs"]) * raw["epochs"]
    if isinstance(raw.get("preflight"), dict):
        raw["preflight"]["prompts"] = shrink(raw["preflight"]["prompts"], scale, MIN_PREFLIGHT)
    if "eval_pairs" in raw:  # a reward model's held-out pairs
        raw["eval_pairs"] = shrink(raw["eval_pairs"], scale, MIN_EVAL)


def apply_scale(recipe: Recipe, where) -> Recipe:
    """`recipe` with its `scale` applied (unchanged at scale 1); a scaled stage that the schema refuses is one
    RecipeError line naming the stage (`where(*key)` locates a key in the file)."""
    scale = recipe.scale
    if scale == 1:
        return recipe
    fields = {name: stage.model_dump(exclude_unset=True) for name, stage in recipe.stages.items()}
    dumped = {name: stage.model_dump() for name, stage in recipe.stages.items()}
    for raw in dumped.values():
        _scale_stage(raw, scale)
    for name, raw in dumped.items():
        if raw.get("teacher_schedule"):
            _schedule(raw, raw["steps"] / recipe.stages[name].steps, recipe.stages, dumped)
    stages = {}
    for name, stage in recipe.stages.items():
        raw = dumped[name]
        # only the keys the file set, or that scaling changed: validators that look at which keys were given
        # (`min_reward`, `lam`) see what the author wrote
        changed = {k: v for k, v in raw.items() if k in fields[name] or v != getattr(stage, k)}
        try:
            stages[name] = type(stage).model_validate(changed)
        except ValidationError as err:
            e = err.errors()[0]
            raise RecipeError(f"{where('scale')}: stage {name!r} at scale {scale:g}: "
                              f"{'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    ev = recipe.eval.model_copy(update={"size": shrink(recipe.eval.size, scale, MIN_EVAL)})
    out = recipe.model_copy(update={"stages": stages, "eval": ev})
    out._data_domains = {
        i: spec if spec.eval_size is None else spec.model_copy(update={"eval_size": shrink(spec.eval_size, scale,
                                                                                           MIN_EVAL)})
        for i, spec in recipe.data_domains.items()
    }
    return out


def scaled_run_dir(name: str, scale: float) -> str:
    """The default run directory's name of a recipe at `scale`: never the full recipe's."""
    return name if scale == 1 else f"{name}-scale{scale:g}"
