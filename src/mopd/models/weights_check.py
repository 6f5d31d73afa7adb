"""Whether a checkpoint's weights are the model its config.json describes, read from the safetensors headers
(names and shapes, no tensor data) against that model built on the meta device (no memory).

Why not trust `from_pretrained`: a key it does not find is left at its random initialisation and reported only
in a log (a config naming BertModel over Qwen weights loaded as a random model and the run exited 0), and a
shape that contradicts the config prints transformers' 13-23 line report. A checkpoint whose keys or shapes do
not match its config is wrong, so it is one line, before its weights are used.

What is not a mismatch: a parameter tied to another (lm_head.weight with tie_word_embeddings) present under one
of its names; keys transformers itself ignores on load (`_keys_to_ignore_on_load_*`, e.g. old rotary
`inv_freq` buffers); keys saved without, or with, the model's base prefix (`model.`), which from_pretrained
adds or strips. A directory without safetensors weights (a `.bin` checkpoint, a peft adapter) is left to
from_pretrained.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

SHOWN = 2  # keys named in the one line, per kind of mismatch


def _saved_shapes(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """Every tensor name and shape in the directory's safetensors files (sharded or not), headers only."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files or (directory / "adapter_config.json").is_file():
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _meta_model(directory: Path) -> torch.nn.Module | None:
    """The model class `checkpoint.load_model` would load for `directory`, built from its config on meta."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from .checkpoint import auto_class

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its advice on the class it builds is not the user's business here
    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            return auto_class(directory).from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)


def weights_problem(directory: str | Path) -> str | None:
    """None when the weights in `directory` are exactly the parameters its config.json builds; else one line
    saying which keys are missing, unexpected or of another shape (see the module docstring)."""
    directory = Path(directory)
    try:
        saved = _saved_shapes(directory)
        if saved is None:
            return None
        model = _meta_model(directory)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        return f"cannot read its config.json or weights ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
    state = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in state.items()}
    aliases: dict[int, list[str]] = defaultdict(list)  # one tensor -> every name it has (tied weights)
    for name, tensor in state.items():
        aliases[id(tensor)].append(name)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""

    def as_model_key(key: str) -> str:
        """`key` as the model names it: with or without the base prefix, whichever the model has."""
        for candidate in (key, key.removeprefix(prefix), prefix + key) if prefix else (key,):
            if candidate in expected:
                return candidate
        return key

    found = {as_model_key(k): shape for k, shape in saved.items()}
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    ignore_extra = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    missing = [names[0] for names in aliases.values() if not any(n in found for n in names)
               and not any(p.search(names[0]) for p in ignore_missing)]
    unexpected = [k for k in found if k not in expected and not k.endswith("inv_freq")
                  and not any(p.search(k) for p in ignore_extra)]
    shaped = [f"{k} {list(found[k])} where the config makes {list(expected[k])}" for k in found
              if k in expected and found[k] != expected[k]]
    if not (missing or unexpected or shaped):
        return None
    arch = type(model).__name__
    parts = [f"{len(v)} {what if len(v) > 1 else what.replace('keys', 'key')} ({', '.join(v[:SHOWN])}{', ...' if len(v) > SHOWN else ''})"
             for what, v in (("keys of another shape", shaped), ("missing keys", missing),
                             ("unexpected keys", unexpected)) if v]
    return (f"its weights are not the model its config.json describes ({arch}): {'; '.join(parts)}; the "
            "checkpoint and its config disagree")
