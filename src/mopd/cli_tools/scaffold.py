"""`mopd init`: a commented starter recipe and a plugin-domain template that run as written.

Why: a new project starts from a file that already loads, runs and explains itself, not from a blank page and
the schema. The starter has the demo's shape at a smaller scale (base -> sft -> one SFT + RLVR teacher per
domain -> MOPD student from sft, a few minutes on a laptop CPU); a domain given an existing teacher checkpoint
(`--teachers DOMAIN=DIR`) is distilled from that directory instead of training one. Beside it go the
recipe JSON schema (for yaml-language-server editors) and `my_domains.py`, a plugin registering one domain,
the pattern to copy for your own. `--agent` writes the tool-use starter instead (`scaffold_agent`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..core.schema import NAME_PATTERN
from ..envs import list_domains
from .bundled import SCHEMA_COMMENT, SCHEMA_FILE, schema_text
from .scaffold_agent import agent_files

RECIPE_FILE = "recipe.yaml"
PLUGIN_FILE = "my_domains.py"
PLUGIN_DOMAIN = "vowel_count"  # the domain my_domains.py registers
DEFAULT_DOMAINS = ("reversal", "sorting")


class ScaffoldError(ValueError):
    """A mistake in what `mopd init` was asked, as one line (exit status 2)."""


PLUGIN_TEMPLATE = f'''"""Domains this project adds to mopd: list this file under `plugins:` in the recipe, the names under `domains:`.

A domain is a generator `fn(rng, difficulty) -> (prompt, answer)` registered under a name. Prompts and answers
use the characters of `mopd.envs.ALPHABET` (digits, lowercase letters, `+*=:,-` and space) when the recipe
trains its own tiny models. The verifier defaults to `partial_match_reward` (1 for the exact answer, partial
credit for near misses); pass `verify=fn(problem, completion) -> float` for your own. Held-out prompts are drawn
from the same generator and never trained on.
"""

from __future__ import annotations

import random

from mopd.envs import register_domain

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@register_domain("{PLUGIN_DOMAIN}", difficulties=(1, 2, 3),
                 description="vow:WORD= -> how many of the letters of WORD are vowels; 4, 6 or 8 letters")
def {PLUGIN_DOMAIN}(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(2 + 2 * difficulty))
    return f"vow:{{word}}=", str(sum(c in "aeiou" for c in word))
'''


def recipe_name(directory: Path) -> str:
    """The run's name from the directory's (a plain name, as stage names are), else `my_recipe`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(directory).resolve().name).strip("._-")
    return name if name and re.match(NAME_PATTERN, name) else "my_recipe"


def parse_teachers(text: str | None) -> dict[str, str]:
    """`reversal=runs/demo/teacher_reversal/final,sorting=DIR` -> {domain: checkpoint directory}."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in (text or "").split(",")):
        if not item:
            continue
        domain, sep, path = item.partition("=")
        if not sep or not domain.strip() or not path.strip():
            raise ScaffoldError(f"--teachers: {item!r} is not DOMAIN=CHECKPOINT_DIR")
        out[domain.strip()] = path.strip()
    return out


def _check(domains: list[str], teachers: dict[str, str]) -> dict[str, str]:
    known = [*list_domains(), PLUGIN_DOMAIN]
    if not domains:
        raise ScaffoldError("--domains: name at least one domain")
    for d in domains:
        if d not in known:
            raise ScaffoldError(f"--domains: unknown domain {d!r}; known: {', '.join(sorted(set(known)))}")
        if not re.match(NAME_PATTERN, f"teacher_{d}"):
            raise ScaffoldError(f"--domains: {d!r} cannot be part of a stage name")
    resolved = {}
    for d, path in teachers.items():
        if d not in domains:
            raise ScaffoldError(f"--teachers: {d!r} is not one of --domains ({', '.join(domains)})")
        p = Path(path).expanduser().resolve()
        if not (p / "config.json").is_file():
            raise ScaffoldError(f"--teachers: {path}: no config.json, so not a Hugging Face checkpoint directory")
        resolved[d] = str(p)
    return resolved


def _teacher_stages(domain: str) -> str:
    return (f"  sft_{domain}: {{kind: sft, init: sft, domains: [{domain}], steps: 150, batch_size: 64, lr: 1.0e-3}}\n"
            f"  teacher_{domain}: {{kind: rlvr, init: sft_{domain}, domains: [{domain}], steps: 50, batch_size: 16, "
            f"group_size: 8, lr: 1.0e-4, warmup_steps: 10}}\n")


def recipe_text(name: str, domains: list[str], teachers: dict[str, str]) -> str:
    """The starter recipe: every line that a first edit changes carries a comment."""
    trained = [d for d in domains if d not in teachers]
    teacher_map = ", ".join(f"{d}: {teachers.get(d, f'teacher_{d}')}" for d in domains)
    lines = [
        SCHEMA_COMMENT,
        f"# {name}: a starter recipe written by `mopd init`; it runs as written, in a few minutes on a laptop CPU.",
        "#",
        f"#   mopd validate {RECIPE_FILE}     # every load-time check, nothing trained",
        f"#   mopd run {RECIPE_FILE}          # trains into runs/{name}/: checkpoints, report.md, summary.json",
        "#",
        "#   base (pretrain) -> sft -> per domain: sft_<domain> -> teacher_<domain> (RLVR) -> student (MOPD, from sft)",
        "#",
        "# A domain given an existing checkpoint (`mopd init --teachers DOMAIN=DIR`) is distilled from it instead.",
        "# Every key and its default: `mopd schema` (editors read recipe.schema.json through the first line).",
        f"name: {name}",
        "seed: 0",
        f"domains: [{', '.join(domains)}]   # built-in, or registered by a plugin ({PLUGIN_FILE}: {PLUGIN_DOMAIN})",
        f"plugins: [{PLUGIN_FILE}]               # Python files that register domains (relative to this file)",
        "eval: {size: 64, max_new_tokens: 10}   # held-out prompts per domain, greedy decoding, the domain's verifier",
        "stages:",
        "  base:                                # a tiny Qwen3-architecture model trained from scratch",
        "    kind: pretrain",
        "    model: {hidden_size: 128, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 384}",
        "    steps: 500",
        "    batch_size: 64",
        "    lr: 3.0e-3",
        "    warmup_steps: 20",
        "    schedule: cosine",
        "  sft: {kind: sft, init: base, steps: 50, batch_size: 64, lr: 1.0e-3}   # the shared start of every model",
        "  # one specialist teacher per domain: domain SFT, then GRPO against the domain's verifier",
    ]
    text = "\n".join(lines) + "\n" + "".join(_teacher_stages(d) for d in trained)
    text += "\n".join([
        "  student:",
        "    kind: mopd",
        "    init: sft",
        f"    teachers: {{{teacher_map}}}   # each domain's rollouts are scored by its teacher",
        "    objective: full_reverse_kl   # or sampled (the MOPD paper's), topk (with topk: K), forward_kl, jsd",
        "    temperature: 0.5",
        "    alpha: 0.0                   # advantage = MOPD + alpha * GRPO",
        "    steps: 400",
        "    batch_size: 32",
        "    lr: 1.0e-3",
        "    warmup_steps: 10",
        "    schedule: cosine",
        "    eval_every: 50",
        "    # teachers trained this briefly sit far from the start; warn only above this initial per-token KL",
        "    preflight: {kl_warn: 3.0}",
    ]) + "\n"
    return text


def write_starter(directory: Path, domains: list[str] | None = None, teachers: dict[str, str] | None = None,
                  force: bool = False, agent: bool = False) -> list[Path]:
    """Write recipe.yaml, my_domains.py and recipe.schema.json into `directory` (with `agent`: recipe.yaml,
    my_tools.py and the schema); returns their paths.

    Refuses (ScaffoldError) to replace an existing file unless `force`."""
    directory = Path(directory)
    if agent:
        if domains or teachers:
            raise ScaffoldError("--agent writes its own domains (my_tools.py's shop, and reversal); drop --domains "
                                "and --teachers, or drop --agent")
        files = agent_files(directory, recipe_name(directory))
    else:
        domains = list(dict.fromkeys(domains or DEFAULT_DOMAINS))
        resolved = _check(domains, dict(teachers or {}))
        files = {
            directory / RECIPE_FILE: recipe_text(recipe_name(directory), domains, resolved),
            directory / PLUGIN_FILE: PLUGIN_TEMPLATE,
            directory / SCHEMA_FILE: schema_text(),
        }
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise ScaffoldError(f"{existing[0]}: exists; pass --force to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return list(files)
