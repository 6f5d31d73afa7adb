"""Checkpoint IO: Hugging Face directories plus `mopd.json` lineage, written atomically.

A checkpoint is complete only once its directory has been renamed into place: we write everything into a
temporary sibling directory, fsync, then `os.replace`. A crash mid-write leaves a `.tmp-*` directory that is never
loaded (and is cleaned up on the next write), so an interrupted run never resumes from half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from ..core.errors import StageError
from ..core.run_dir import LINEAGE
from .integrity import sealed_lineage
from .lora import is_lora, merged_copy, save_adapter
from .model_card import write_model_card

hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars drown the run's own progress

TRAINER_STATE_FILE = "trainer_state.pt"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_finite_weights(stage: str, step: int, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Refuse to save weights with a NaN or inf: a checkpoint that exists is one a rerun may trust."""
    for p in parameters:
        if not bool(torch.isfinite(p.detach()).all()):
            raise StageError(f"stage {stage!r}: step {step}: the weights hold NaN or inf; not saved (lower `lr`)")


def save_checkpoint(
    path: Path,
    model,
    tokenizer,
    lineage: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write model + tokenizer + lineage (+ optimizer/RNG state for resuming) to `path`, atomically and sealed
    with checksums (`integrity.sealed_lineage`).

    Refuses (StageError) weights with a NaN or inf, naming the lineage's stage and step."""
    check_finite_weights(lineage.get("stage"), lineage.get("step"), model.parameters())

    def fill(tmp: Path) -> None:
        if is_lora(model):  # a plain HF directory (adapters merged) plus the adapter alone, for resuming
            merged_copy(model).save_pretrained(tmp, safe_serialization=True)
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, lineage)  # README.md: the directory uploads to a Hub as it is
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
        if extra is not None:  # files of a kind's own (a prompted teacher's prompt), sealed with the rest
            extra(tmp)

    return publish_dir(path, fill, lineage)


def publish_dir(path: Path, fill: Callable[[Path], None], lineage: dict[str, Any]) -> Path:
    """Fill a temporary sibling of `path`, add its sealed `mopd.json`, fsync every file, then rename it into
    place: `path` is either absent, the previous complete directory, or the new complete one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        fill(tmp)
        (tmp / LINEAGE).write_text(json.dumps(sealed_lineage(tmp, lineage), indent=2, sort_keys=True))
        for f in (f for f in tmp.rglob("*") if f.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:  # a full disk, a kill: the partial copy is never read, and its space is given back now
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def read_lineage(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / LINEAGE).read_text())


def head_kind(path: str | Path) -> str:
    """`causal_lm`, `sequence_classifier` (a reward model) or `token_classifier` (a PPO critic), from a local
    checkpoint's config.json `architectures` (a Hub id or a directory without one: `causal_lm`)."""
    config = Path(path) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    for suffix, kind in (("ForSequenceClassification", "sequence_classifier"),
                         ("ForTokenClassification", "token_classifier")):
        if any(a.endswith(suffix) for a in architectures):
            return kind
    return "causal_lm"


def auto_class(path: str | Path):
    """The transformers Auto class of the checkpoint's kind (`head_kind`)."""
    return {"sequence_classifier": AutoModelForSequenceClassification,
            "token_classifier": AutoModelForTokenClassification}.get(head_kind(path), AutoModelForCausalLM)


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights are not the model its config.json describes; str() is one line naming it."""


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The checkpoint as the class it was saved as: a causal LM, or a reward model / critic (`head_kind`). A local
    directory whose weights do not match its config is refused first (`weights_check`), never loaded with
    randomly initialised parameters."""
    from .weights_check import weights_problem

    if Path(path).is_dir() and (problem := weights_problem(path)):
        raise CheckpointMismatch(f"{path}: {problem}")
    return auto_class(path).from_pretrained(str(path), dtype=dtype)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(str(path))


def load_trainer_state(path: Path) -> dict[str, Any] | None:
    f = Path(path) / TRAINER_STATE_FILE
    # plain tensors and containers only: a crafted file in a run directory must not run code on `mopd run`
    return torch.load(f, weights_only=True) if f.exists() else None
