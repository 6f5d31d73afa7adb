"""A stage's identity: the hash of its settings and its parents' identities.

Why: a rerun skips finished stages and resumes an interrupted one, and changing one teacher reruns only what
depends on it. Settings that change how a step is computed but not what is trained stay out of the hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.schema import DEFAULT_REWARD
from ..models.gguf import find_gguf, gguf_sha256, is_gguf_ref
from .load import LoadedRecipe
from .refs import resolve_external
from .tokenizer import tokenizer_identity

# they change logging (and the MOPD preflight check), how a step's gradient is computed (micro-batches, and blocks
# of logit positions: the same loss and gradient up to float rounding), or what happens on a non-finite step (a
# stage that finished had none under `stop`), not what is trained
SETTINGS_NOT_IN_IDENTITY = {
    "checkpoint_every", "eval_every", "preflight", "micro_batch_size", "logit_chunk", "memory_budget_gib", "nonfinite",
    "resources",  # where and with what a stage runs (the Ray executor), not what it trains
    "teacher_backends",  # where a MOPD stage's teachers score (in process, a Ray actor, a server), not who they are
    "learner",  # data-parallel learner workers: the same gradient up to float rounding (like micro-batches)
    "teacher_shared_prefill",  # each prompt's teacher prefill once per group: the same scores up to float rounding
    "micro_batch_by_length",  # which rows share a micro-batch, and its columns: the same gradient up to rounding
    "log_samples",  # which rollouts are written as transcripts: drawn with their own generator, nothing trained
}


def external_identity(ref: str, base) -> str:
    """A model from outside the recipe: its resolved path, or a GGUF's content hash (the cache moves, it does not)."""
    if is_gguf_ref(ref):
        return f"gguf:{gguf_sha256(find_gguf(ref, base))}"
    return f"external:{resolve_external(ref, base) or ref}"


def stage_identities(loaded: LoadedRecipe) -> dict[str, str]:
    recipe = loaded.recipe
    ids: dict[str, str] = {}
    for name in loaded.order:
        stage, facts = recipe.stages[name], loaded.facts[name]
        settings = stage.model_dump(mode="json", exclude=SETTINGS_NOT_IN_IDENTITY)
        parents = {ref: ids.get(ref) or external_identity(ref, loaded.path.parent) for _, ref in facts.refs}
        payload = {
            "settings": settings,
            "seed": facts.seed,
            "domains": list(facts.domains),
            "eval": recipe.eval.model_dump(mode="json"),
            "tokenizer": tokenizer_identity(recipe, recipe.tokenizer),
            "parents": parents,
        }
        _tokenizer_setting(recipe, stage, settings)
        payload.update(_real_model_identity(recipe, settings))
        _reward_identity(settings)
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
    if settings.get("rollout", 0) is None:  # rollout workers: how many never changes a batch; the lag and the
        settings.pop("rollout")            # groups sampled per call do
    elif "rollout" in settings:
        settings["rollout"] = {k: settings["rollout"][k] for k in ("max_lag", "groups_per_call")}
    extra: dict = {}
    if recipe.data_domains:  # a domain's own eval length enters only when set, as `eval` does (what is scored)
        extra["data_domains"] = [d.model_dump(mode="json", exclude={"max_new_tokens"} if getattr(
            d, "max_new_tokens", None) is None else None) for d in recipe.data_domains.values()]
    rendering = {"chat_template": recipe.chat_template, "chat_template_kwargs": recipe.chat_template_kwargs,
                 "dtype": recipe.dtype}
    if rendering != {"chat_template": "auto", "chat_template_kwargs": {}, "dtype": "auto"}:
        extra["rendering"] = rendering
    if recipe.master_weights != "float32":
        extra["master_weights"] = recipe.master_weights
    if recipe.scale != 1:  # a scaled run's stages never pass for the full recipe's (`recipe.scale`)
        extra["scale"] = recipe.scale
    return extra


def _tokenizer_setting(recipe, stage, settings: dict) -> None:
    """A pretrain stage's own `tokenizer:` enters its identity (and so its descendants') in the form
    `tokenizer_identity` gives it; absent, it stays out, as before the setting existed (the recipe's tokenizer is
    in every identity)."""
    if settings.get("tokenizer", 0) is None:
        settings.pop("tokenizer")
    elif "tokenizer" in settings:
        settings["tokenizer"] = tokenizer_identity(recipe, stage.tokenizer)


def _reward_identity(settings: dict) -> None:
    """The default reward source (`verifier`, what every stage used before `reward:` existed) stays out of the
    hash; a preference dataset enters by its content, not its path (the loader made the path absolute)."""
    if settings.get("reward") == DEFAULT_REWARD:
        settings.pop("reward")
    for key in ("domain_weights", "domain_thresholds"):  # None: as before the setting existed
        if key in settings and settings[key] is None:
            settings.pop(key)
    pairs = settings.get("pairs_from")
    if isinstance(pairs, dict) and "dataset" in pairs:
        settings["pairs_from"] = {"dataset_sha256": hashlib.sha256(Path(pairs["dataset"]).read_bytes()).hexdigest()}
