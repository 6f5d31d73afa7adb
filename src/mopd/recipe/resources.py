"""Load-time checks of what a recipe needs beyond its own text: its data domains, the machine, optional packages.

Why here and not at stage start: a recipe that names `device: cuda` on a laptop, a LoRA stage without peft, or a
data set whose records the verifier cannot score must fail before the first stage spends any compute, in one line
naming the file, line and key (the `where` callable of `load.py` builds that prefix).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..core.errors import RecipeError
from ..core.schema import DataDomainSpec, EvalSettings, Recipe, SFTStage, VerifiersDomainSpec
from ..envs import list_domains
from ..envs.data import DataDomain, DataDomainError
from ..envs.tool_domains import is_agentic
from ..models.precision import emulated_bfloat16, resolve_placement
from ..sampling.backend import vllm_unavailable_reason
from ..tracking import enabled, missing_extra
from .demonstrations import load_demonstration
from .tokenizer import scratch_settings, tokenizer_alphabet
from .yaml_file import Where


def build_data_domains(recipe: Recipe, recipe_path: Path, where: Where) -> dict[str, Any]:
    """Build and read (local sources) every data or verifiers domain the recipe declares. They are not
    registered: they travel in the loaded recipe, so loading one recipe never changes what another process-wide
    lookup sees."""
    built: dict[str, Any] = {}
    for i, spec in recipe.data_domains.items():
        at = lambda *key, i=i: where("domains", i, *key)  # noqa: E731
        if isinstance(spec, VerifiersDomainSpec):
            domain = _verifiers_domain(spec, recipe, at, recipe_path.parent)
        else:
            domain = _data_domain(spec, recipe, recipe_path, at)
        if spec.name in list_domains():
            raise RecipeError(f"{at('name')}: domain name {spec.name!r} is taken by a built-in or plugin domain; "
                              "pick another name")
        built[spec.name] = domain
    return built


def data_domain(spec: DataDomainSpec, eval_settings: EvalSettings, base_dir: Path | None) -> DataDomain:
    """The domain a data declaration names, its local records read now (a recipe's, or `mopd eval --domains
    bundled:math`'s); raises DataDomainError, whose `key` is the declaration's offending key."""
    domain = DataDomain(
        spec.name, spec.source, spec.verifier,
        fields=spec.fields.model_dump(exclude_none=True), format=spec.format, split=spec.split,
        eval_split=spec.eval_split, domain_column=spec.domain_column, domain_value=spec.domain_value,
        eval_size=spec.eval_size, default_eval_size=eval_settings.size, limit=spec.limit,
        seed=eval_settings.seed, code_timeout_s=spec.code_timeout_s, base_dir=base_dir,
        max_new_tokens=spec.max_new_tokens,
    )
    return domain.load() if domain.local else domain


def _data_domain(spec: DataDomainSpec, recipe: Recipe, recipe_path: Path, at: Where) -> DataDomain:
    try:
        return data_domain(spec, recipe.eval, recipe_path.parent)
    except DataDomainError as e:
        raise RecipeError(f"{at(*e.key)}: {e}") from None


def _verifiers_domain(spec: VerifiersDomainSpec, recipe: Recipe, at: Where, base: Path) -> Any:
    """The taskset loaded by id (verifiers' own loader) and its tasks read now, so a missing package, a bad
    setting or a task mopd cannot play is one line before compute."""
    from ..envs.episode import Limits
    from ..envs.verifiers_env import load_taskset, verifiers_domain

    limits = Limits(max_turns=spec.max_turns, max_tokens=spec.max_tokens, tool_time_s=spec.tool_time_s,
                    max_observation_chars=spec.max_observation_chars, max_parallel_calls=spec.max_parallel_calls)
    demonstration = None
    if spec.demonstration is not None:
        try:
            demonstration = load_demonstration(spec.demonstration, base)
        except ValueError as e:
            raise RecipeError(f"{at('demonstration')}: {e}") from None
    try:
        domain = verifiers_domain(spec.name, load_taskset(spec.verifiers, spec.settings), eval_size=spec.eval_size,
                                  seed=recipe.eval.seed, answer_field=spec.answer_field, limits=limits,
                                  demonstration=demonstration)
    except Exception as e:  # the taskset's package (and a generator) is plugin code: whatever it raises is one line
        text = str(e).strip().splitlines()
        key = "demonstration" if demonstration is not None and "demonstration" in str(e) else "verifiers"
        raise RecipeError(f"{at(key)}: {spec.verifiers!r}: {type(e).__name__}: "
                          f"{text[0] if text else ''}") from None
    if demonstration is not None and not is_agentic(domain):
        raise RecipeError(f"{at('demonstration')}: {spec.verifiers!r} has no tools, so its tasks are single turns and "
                          f"SFT trains on `{spec.answer_field}`; a demonstration is the turns of a tool-use episode")
    return domain


def check_data_fit(recipe: Recipe, data: dict[str, Any], where: Where) -> None:
    """SFT stages need reference completions (the alphabet of every domain is checked by the loader:
    `alphabet_gap`)."""
    for name, stage in recipe.stages.items():
        if not isinstance(stage, SFTStage):  # pretraining reads prompts as a corpus; answers are optional there
            continue
        for d in stage.domains or recipe.domains:
            if d in data and data[d].local and not data[d].has_answers:
                raise RecipeError(
                    f"{where('stages', name, 'domains')}: {stage.kind} trains on reference completions, but data "
                    f"domain {d!r} has records without one (map `fields.answer`, or `answer_field` for a verifiers "
                    "domain, or leave it out of this stage)"
                )


def alphabet_gap(recipe: Recipe, domain: Any, label: str) -> str | None:
    """Where the recipe builds its own tokenizers (one for each `tokenizer:` of a pretrain stage from scratch),
    the characters of a domain's prompts and answers (`characters()`, known at load) that one lacks, as one line;
    None when they cover them or nothing is known."""
    if not callable(getattr(domain, "characters", None)) or not getattr(domain, "local", False):
        return None
    for settings in scratch_settings(recipe):
        missing = sorted(domain.characters() - set(tokenizer_alphabet(settings)))
        if missing:
            shown = "".join(missing[:20]).encode("unicode_escape").decode()
            return (f"{len(missing)} character(s) of {label} are not in the tiny model's tokenizer alphabet "
                    f"({shown!r}); set `tokenizer: {{alphabet: printable}}` or list them")
    return None


def check_machine(recipe: Recipe, where: Where) -> None:
    """Devices, rollout backend and LoRA the recipe asks for must exist on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    if recipe.device == "cuda" and not cuda:
        raise RecipeError(f"{where('device')}: `cuda` asked for, but torch sees no CUDA device here (use auto or cpu)")
    for name, stage in recipe.stages.items():
        if getattr(stage, "device", None) == "cuda" and not cuda:
            raise RecipeError(f"{where('stages', name, 'device')}: `cuda` asked for, but torch sees no CUDA device here")
        if getattr(stage, "lora", None) is not None and importlib.util.find_spec("peft") is None:
            raise RecipeError(f"{where('stages', name, 'lora')}: LoRA needs peft (pip install 'mopd[lora]')")
    for tracker in enabled(recipe.logging):  # a tracker asked for but not installed: one line, before compute
        if why := missing_extra(tracker):
            raise RecipeError(f"{where('logging', tracker)}: {why}")
    if recipe.rollout_backend == "vllm":
        reason = vllm_unavailable_reason()
        if reason:
            raise RecipeError(f"{where('rollout_backend')}: vllm backend unavailable: {reason}")


def precision_warnings(recipe: Recipe) -> list[str]:
    """A one-line warning when stages would compute in bfloat16 where the hardware has no bfloat16 matrix
    multiply (an AVX2-only CPU): legal, so not an error, but the MOPD step ran 8x slower than in float32 there,
    which a user should hear about before the first stage rather than guess from a slow progress bar."""
    import torch

    slow = [name for name, stage in recipe.stages.items()
            if (p := resolve_placement(stage, recipe)).compute_dtype == torch.bfloat16 and emulated_bfloat16(p.device)]
    if not slow:
        return []
    return [f"stage(s) {', '.join(slow)} compute in bfloat16 on a CPU without bfloat16 matrix multiplies "
            "(no AVX512): emulated there, about 8x slower than float32; `dtype: auto` picks float32"]


def check_resources(recipe: Recipe, recipe_path: Path, where: Where) -> dict[str, Any]:
    """All of the above, in order; returns the data domains built (name -> DataDomain)."""
    data = build_data_domains(recipe, recipe_path, where)
    check_data_fit(recipe, data, where)
    check_machine(recipe, where)
    return data
