"""A recipe file as text, YAML and schema: each mistake in it one RecipeError line naming the file, the line and
the key, which every later check reuses through `where_in_file`.

Why the line map is kept beside the parsed recipe: pydantic and the loader's own checks know a mistake by its key
path (stages.student.lr); the user reads a file, so the line of that key is what makes the message useful.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..core.errors import RecipeError
from ..core.schema import KINDS, Recipe

# How far a recipe's YAML may nest, and how many values (scalars and collections) it may hold once its aliases are
# expanded. The deepest bundled recipe nests 5 levels and the largest holds a few hundred values; data belongs in
# files. Why bounds at all: the line map and the duplicate-key walk visit every expanded value (an alias bomb of
# 9 levels of 10 aliases is 10^9 of them, about 70 minutes), and YAML's composer recurses once per level (1000
# levels is a RecursionError).
MAX_DEPTH = 64
MAX_VALUES = 100_000


def read_yaml(path: Path) -> tuple[yaml.Node | None, Any]:
    """The file's node tree (which knows lines) and its plain data, or the one line saying why it has neither."""
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file")
    if not path.is_file():
        raise RecipeError(f"{path}: not a file (a recipe is a YAML file)")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise RecipeError(f"{path}: cannot read it as a YAML text file ({e.__class__.__name__})") from None
    try:
        refuse_bombs(path, text)
        return yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None


def refuse_bombs(path: Path, text: str) -> None:
    """One RecipeError line when the YAML nests deeper than MAX_DEPTH or its aliases expand it past MAX_VALUES,
    found from the parser's events (a loop, no recursion, each event once) before anything is built from them.

    An alias counts as many values as its anchor's node expands to, known when that node ends, so the sum is the
    size of the expanded document without expanding it."""
    expanded: dict[str, int] = {}  # anchor -> values its node expands to
    open_nodes: list[tuple[int, str | None]] = []  # each open collection: (total when it started, its anchor)
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            total += expanded.get(event.anchor, 1)
            if total > MAX_VALUES:
                raise RecipeError(f"{path}:{line}: the alias *{event.anchor} expands the recipe past {MAX_VALUES:,} "
                                  "values (a recipe holds at most that many; an alias bomb?)")
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                expanded[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            open_nodes.append((total - 1, event.anchor))
            if len(open_nodes) > MAX_DEPTH:
                raise RecipeError(f"{path}:{line}: nested more than {MAX_DEPTH} levels deep (a recipe nests at most "
                                  f"{MAX_DEPTH})")
        elif isinstance(event, yaml.CollectionEndEvent):
            start, anchor = open_nodes.pop()
            if anchor is not None:
                expanded[anchor] = total - start
        if total > MAX_VALUES:
            raise RecipeError(f"{path}:{line}: the recipe holds more than {MAX_VALUES:,} values (a recipe holds at "
                              "most that many; data belongs in a data file)")


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path (('stages', 'sft', 'lr')) to its 1-based line in the file."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = (*prefix, k.value)
            out[path] = k.start_mark.line + 1
            out.update(key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = (*prefix, i)
            out[path] = v.start_mark.line + 1
            out.update(key_lines(v, path))
    return out


def refuse_duplicate_keys(path: Path, node: yaml.Node | None) -> None:
    """YAML lets a later key silently replace an earlier one; a recipe that says a setting twice is a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for k, v in node.value:
            if k.value in seen:
                raise RecipeError(
                    f"{path}:{k.start_mark.line + 1}: key {k.value!r} appears twice in one mapping "
                    f"(first on line {seen[k.value]})"
                )
            seen[k.value] = k.start_mark.line + 1
            refuse_duplicate_keys(path, v)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            refuse_duplicate_keys(path, v)


# `where(*key)`: a key of the recipe as 'FILE:LINE: key.path', the start of every load-time error line
Where = Callable[..., str]


def where_in_file(path: Path, lines: dict[tuple, int], key: tuple) -> str:
    """`file:line: dotted.key`, the line of the deepest part of `key` the file has (a default has none)."""
    key = _as_yaml_keys(lines, tuple(key))
    line = None
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            line = lines[key[:n]]
            break
    dotted = ".".join(str(k) for k in key) or "(top level)"
    return f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"


def _as_yaml_keys(lines: dict[tuple, int], key: tuple) -> tuple:
    """`key` with each number that is a mapping key in the file (`7:` parsed to 7) spelled as the file has it:
    the line map holds mapping keys as text and list positions as numbers."""
    out: tuple = ()
    for k in key:
        out += (k if (*out, k) in lines or not isinstance(k, int) else str(k),)
    return out


def validate_recipe(path: Path, lines: dict[tuple, int], raw: Any) -> Recipe:
    """The schema's reading of the file's data, or its first complaint as one line at the offending key."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with at least `name`, `domains` and `stages`")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise schema_error(path, lines, err) from None


def schema_error(path: Path, lines: dict[tuple, int], err: ValidationError) -> RecipeError:
    """pydantic's first error in the recipe's own words: the location as the file spells it (without the tags
    pydantic inserts for unions), and plain wording for unknown keys and stage kinds."""
    e = err.errors()[0]
    loc = list(e["loc"])
    # pydantic inserts the union tag (the stage kind) into the location: stages.<name>.<kind>.<field>
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in KINDS:
        del loc[2]
    # ... and the entry tag of a domain (a name or a data mapping): domains.<i>.data.<field>
    if len(loc) >= 3 and loc[0] == "domains" and loc[2] in ("name", "data"):
        del loc[2]
    # ... and the backend of a teacher: stages.<name>.teacher_backends.<teacher>.<backend>.<field>
    if len(loc) >= 5 and loc[2] == "teacher_backends" and loc[4] in ("actor", "http"):
        del loc[4]
    msg = e["msg"]
    if loc and loc[-1] == "[key]":  # a mapping key YAML read as a number or a bool (`7:`, `yes:`)
        loc.pop()
        msg = f"a name must be a string: quote it ('{loc[-1]}')"
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid" and len(loc) == 2:  # a stage's (other unions keep pydantic's words)
        loc.append("kind")
        msg = f"unknown stage kind {e['input'].get('kind')!r}; expected one of {', '.join(KINDS)}"
    elif e["type"] == "union_tag_not_found" and len(loc) == 2:
        msg = f"missing `kind`; expected one of {', '.join(KINDS)}"
    return RecipeError(f"{where_in_file(path, lines, tuple(loc))}: {msg}")
