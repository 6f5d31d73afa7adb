"""Checksums that make a checkpoint directory self-verifying: what is on disk is what was written.

A finished stage is skipped on rerun, a resumable checkpoint is resumed, and a report is built, all from files
that a crash, a full disk, a sync tool or a hand edit may have truncated or changed. So every checkpoint's
lineage (`mopd.json`) records the size and sha256 of each other file in its directory (`files`) and a sha256 of
its own content (`checksum`); `checkpoint_problem` recomputes both before anything trusts the directory, and
names the first file that does not match.

A lineage without `files` was written before checksums existed: it is accepted as before (a readable `mopd.json`
beside a `config.json` or an `eval.json`), so older run directories stay valid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from ..core.run_dir import EVAL_JSON, FINAL, LINEAGE, METRICS, SNAPSHOTS

# a stage directory's outputs: its final checkpoint, the snapshots it keeps, and its metrics log, whose size and
# sha256 the final lineage records under METRICS_KEY (the log is complete once the final checkpoint is written)
METRICS_KEY = "metrics_log"
FILES_KEY = "files"
CHECKSUM_KEY = "checksum"
# what a pre-checksum directory must hold besides mopd.json: a model (config.json) or an eval stage's scores
_LEGACY_PAYLOAD = ("config.json", EVAL_JSON)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lineage_checksum(lineage: dict[str, Any]) -> str:
    """sha256 of the lineage's canonical JSON without its own checksum (keys sorted, no whitespace)."""
    body = {k: v for k, v in lineage.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed_lineage(directory: Path, lineage: dict[str, Any]) -> dict[str, Any]:
    """`lineage` plus the manifest of every file under `directory` (mopd.json excepted) and its own checksum.

    The lineage goes through a JSON round trip first (non-JSON values become strings, as when it is written),
    so the checksum is that of exactly what a reader parses back."""
    directory = Path(directory)
    files = {
        f.relative_to(directory).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.relative_to(directory).as_posix() != LINEAGE
    }
    sealed = json.loads(json.dumps({**lineage, FILES_KEY: files}, default=str))
    sealed.pop(CHECKSUM_KEY, None)
    sealed[CHECKSUM_KEY] = lineage_checksum(sealed)
    return sealed


def _manifest_path_problem(directory: Path, rel: str) -> str | None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return f"{directory / LINEAGE}: its file list names a path outside the checkpoint ({rel!r})"
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """None when `directory` is an intact checkpoint; otherwise one line naming the file that is missing,
    unreadable, truncated or changed. Reads every listed file once (sha256)."""
    directory = Path(directory)
    lineage_path = directory / LINEAGE
    if not lineage_path.is_file():
        return f"{lineage_path}: missing"
    try:
        lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{lineage_path}: unreadable ({e.__class__.__name__}: {e})"
    if not isinstance(lineage, dict):
        return f"{lineage_path}: not a JSON object"
    files = lineage.get(FILES_KEY)
    if files is None:  # written before checksums: the old test of completeness
        if not any((directory / name).is_file() for name in _LEGACY_PAYLOAD):
            return f"{directory / 'config.json'}: missing"
        return None
    if lineage.get(CHECKSUM_KEY) != lineage_checksum(lineage):
        return f"{lineage_path}: changed since it was written (its checksum does not match)"
    if not isinstance(files, dict):
        return f"{lineage_path}: `{FILES_KEY}` is not a mapping"
    for rel, want in sorted(files.items()):
        if problem := _manifest_path_problem(directory, rel):
            return problem
        path = directory / rel
        if not isinstance(want, dict) or not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{path}: {size} bytes, {want.get('bytes')} were written (truncated or changed)"
        if file_sha256(path) != want.get("sha256"):
            return f"{path}: contents changed since it was written (sha256 mismatch)"
    return None


def sealed_dir_problem(directory: Path) -> str | None:
    """`checkpoint_problem` for a directory that carries a `mopd.json` (a stage's checkpoint, a converted GGUF);
    None for a plain Hugging Face directory, which has no checksums to check."""
    return checkpoint_problem(directory) if (Path(directory) / LINEAGE).is_file() else None


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def stage_output_problem(stage_dir: Path) -> str | None:
    """None when a finished stage's outputs are intact: its final checkpoint, each kept snapshot, and the metrics
    log its final lineage recorded; else one line naming the first file that fails."""
    stage_dir = Path(stage_dir)
    final = stage_dir / FINAL
    for directory in (final, *sorted((stage_dir / SNAPSHOTS).glob("step-*"))):
        if problem := checkpoint_problem(directory):
            return problem
    want = json.loads((final / LINEAGE).read_text(encoding="utf-8")).get(METRICS_KEY)
    if want is None:  # written before the log was recorded
        return None
    log = stage_dir / METRICS
    if not log.is_file():
        return f"{log}: missing"
    if file_record(log) != want:
        return f"{log}: changed since the stage finished (size or sha256 differs from its final lineage)"
    return None
