"""Load prompt records for real verifiable domains from JSONL, JSON, parquet or a ``datasets`` dataset.

``load_prompts(source, ...)`` returns a list of :class:`PromptRecord`. ``source`` is one of

* a ``.jsonl`` file (one JSON object per line; blank lines are skipped) or a ``.json`` file holding a
  list of objects;
* a ``.parquet`` file (needs ``pyarrow``);
* a directory written by ``datasets`` ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``, whose
  ``split`` is taken), or a Hugging Face Hub id such as ``"org/name"`` (needs ``datasets``; loaded
  with ``load_dataset(id, split=split)``);
* ``"bundled:math"``, ``"bundled:code"`` or ``"bundled:instructions"``: small sets shipped with mopd.

Columns: ``field_map`` maps our names (``prompt``, ``reference``, ``tests``, ``constraints``, ``domain``) to
the source's column names. Without a mapping, ``prompt`` is read from ``prompt``, ``reference`` from
``reference`` or else ``answer`` (it is optional), the domain from ``domain``. Every other non-null column
ends up in ``meta`` (mapped ``tests``/``constraints`` under those names), e.g. ``meta["tests"]`` for code
and ``meta["constraints"]`` for instruction following (validated on load with
``mopd.verifiers.validate_constraints``, so an unknown rule type fails here). The domain is, in this order: the column
``domain_column`` (or ``field_map["domain"]``), the ``domain`` argument for every record, the source's
``domain`` column; a record without any is an error.

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing path) with one line naming the
source, the record and the missing column.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..verifiers.instructions import validate_constraints

__all__ = ["BUNDLED", "PromptRecord", "bundled_path", "load_prompts"]

_BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED: tuple[str, ...] = ("code", "instructions", "math")
_OUR_FIELDS = ("prompt", "reference", "tests", "constraints", "domain")
_FORMATS = ("jsonl", "json", "parquet", "datasets")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a verifiable domain; ``meta`` carries the verifier's data (tests, constraints...)."""

    prompt: str
    domain: str
    reference: str | None = None
    meta: dict = field(default_factory=dict)


def bundled_path(name: str) -> Path:
    """Path of a bundled prompt file: ``bundled_path("math")`` -> ``.../mopd/data/bundled/math.jsonl``."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled prompt set {name!r}; available: {', '.join(BUNDLED)}")
    return _BUNDLED_DIR / f"{name}.jsonl"


def load_prompts(
    source: str | Path,
    *,
    format: str | None = None,
    split: str = "train",
    domain_column: str | None = None,
    field_map: dict[str, str] | None = None,
    domain: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read prompt records from ``source`` (see the module docstring for formats and column rules)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmap = dict(field_map or {})
    unknown = sorted(set(fmap) - set(_OUR_FIELDS))
    if unknown:
        raise ValueError(f"field_map: unknown field(s) {unknown}; mappable fields: {', '.join(_OUR_FIELDS)}")
    if domain_column is not None:
        if "domain" in fmap and fmap["domain"] != domain_column:
            raise ValueError(
                f"domain_column={domain_column!r} contradicts field_map['domain']={fmap['domain']!r}"
            )
        fmap["domain"] = domain_column

    if isinstance(source, str) and source.startswith("bundled:"):
        source = bundled_path(source.split(":", 1)[1])
    fmt, label = _detect_format(source, format)
    rows = _read_rows(source, fmt, split, limit)
    records = []
    for where, row in rows:
        records.append(_to_record(row, fmap, domain, f"{label}{where}"))
        if limit is not None and len(records) >= limit:
            break
    return records


# ------------------------------------------------------------------------------------------- readers


def _detect_format(source: str | Path, fmt: str | None) -> tuple[str, str]:
    if fmt is not None:
        fmt = fmt.lower()
        if fmt in ("hf", "huggingface", "arrow"):
            fmt = "datasets"
        if fmt not in _FORMATS:
            raise ValueError(f"{source}: unknown format {fmt!r}; known formats: {', '.join(_FORMATS)}")
    path = Path(source)
    if path.exists():
        if fmt is None:
            if path.is_dir():
                fmt = "datasets"
            elif path.suffix.lower() in (".jsonl", ".ndjson"):
                fmt = "jsonl"
            elif path.suffix.lower() == ".json":
                fmt = "json"
            elif path.suffix.lower() in (".parquet", ".pq"):
                fmt = "parquet"
            else:
                raise ValueError(
                    f"{path}: cannot tell the format from the suffix; pass format= one of {_FORMATS}"
                )
        return fmt, str(path)
    if fmt in (None, "datasets") and isinstance(source, str) and _looks_like_hub_id(source):
        return "datasets", source
    raise FileNotFoundError(f"{source}: no such file or directory")


def _looks_like_hub_id(s: str) -> bool:
    if Path(s).suffix.lower() in {".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".csv", ".txt", ".arrow"}:
        return False  # a missing local file, not a Hub id
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in s


def _read_rows(source: str | Path, fmt: str, split: str, limit: int | None) -> Iterator[tuple[str, dict]]:
    if fmt == "jsonl":
        return _read_jsonl(Path(source))
    if fmt == "json":
        return _read_json(Path(source))
    if fmt == "parquet":
        return _read_parquet(Path(source), limit)
    return _read_datasets(source, split, limit)


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f":{lineno}", row


def _read_json(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (use .jsonl for one object per line)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
        yield f": record {i}", row


def _read_parquet(path: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    return _enumerate_rows(table.to_pylist())


def _read_datasets(source: str | Path, split: str, limit: int | None) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{source}: reading a datasets dataset needs datasets (pip install datasets)"
        ) from None
    if Path(source).exists():
        ds = datasets.load_from_disk(str(source))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{source}: no split {split!r}; available splits: {', '.join(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(source), split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _enumerate_rows(ds)


def _enumerate_rows(rows: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(rows):
        yield f": record {i}", dict(row)


# ---------------------------------------------------------------------------------------- conversion


def _to_record(row: dict, fmap: dict[str, str], domain: str | None, where: str) -> PromptRecord:
    def column(ours: str, fallbacks: tuple[str, ...] = ()) -> str | None:
        if ours in fmap:
            col = fmap[ours]
            if col not in row:
                raise ValueError(
                    f"{where}: missing column {col!r} (mapped from {ours!r}); columns: {', '.join(map(str, row))}"
                )
            return col
        for col in (ours, *fallbacks):
            if col in row:
                return col
        return None

    prompt_col = column("prompt")
    if prompt_col is None:
        raise ValueError(
            f"{where}: missing column 'prompt'; columns: {', '.join(map(str, row))} (use field_map)"
        )
    prompt = row[prompt_col]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: column {prompt_col!r} must be a non-empty string, got {prompt!r:.60}")

    ref_col = column("reference", ("answer",))
    reference = row.get(ref_col) if ref_col is not None else None
    if reference is not None and not isinstance(reference, str):
        if isinstance(reference, (int, float)) and not isinstance(reference, bool):
            reference = str(reference)
        else:
            raise ValueError(
                f"{where}: column {ref_col!r} must be a string or a number, got {reference!r:.60}"
            )

    explicit_domain_col = fmap.get("domain")
    domain_col = column("domain")
    if explicit_domain_col is not None or domain is None:
        value = row.get(domain_col) if domain_col is not None else None
        if value is None:
            if explicit_domain_col is not None:
                raise ValueError(f"{where}: column {explicit_domain_col!r} (the domain) is empty")
            raise ValueError(f"{where}: missing column 'domain'; pass domain= or domain_column=")
        record_domain = str(value)
    else:
        record_domain = domain

    consumed = {c for c in (prompt_col, ref_col, domain_col) if c is not None}
    meta: dict[str, Any] = {}
    for ours in ("tests", "constraints"):
        col = column(ours)
        if col is not None:
            consumed.add(col)
            if row[col] is not None:
                meta[ours] = row[col]
    for key, value in row.items():
        if key not in consumed and value is not None:
            meta[str(key)] = value
    if "constraints" in meta:
        try:
            meta["constraints"] = validate_constraints(_normalize_constraints(meta["constraints"], where))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return PromptRecord(prompt=prompt, domain=record_domain, reference=reference, meta=meta)


def _normalize_constraints(value: Any, where: str) -> Any:
    if isinstance(value, str):  # stored as a JSON string (convenient in CSV/parquet)
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{where}: column 'constraints' is a string but not valid JSON") from None
    if isinstance(value, (list, tuple)):
        # Columnar formats fill absent struct fields with None: drop them.
        return [{k: v for k, v in c.items() if v is not None} if isinstance(c, dict) else c for c in value]
    return value
