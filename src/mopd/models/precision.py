"""Where a stage's models live and in which precision: `device`, `dtype` and `master_weights` of the recipe (or
the stage), resolved once per stage into a `Placement`.

auto device: CUDA when torch sees one, else CPU. auto dtype: bfloat16 on a CUDA device that supports it (the
usual precision of the released checkpoints, half the memory), else float32 (the tiny models' tests compare
exact float32 numbers).

`dtype` is the compute precision. The weights a stage trains (and AdamW's state) stay in float32 by default
(`master_weights: float32`) and the step runs under autocast: a bfloat16 weight has 8 bits of mantissa, so an
update smaller than about 1/256 of the weight rounds away, and at the learning rates real models use (1e-6 on a
weight of 0.02) almost every update would (`tests/test_precision.py`). Frozen models (teachers, the base of a
LoRA model, evaluation) hold `dtype` itself.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        # native bfloat16 only: by default torch also reports True on a pre-Ampere GPU (V100, T4) that merely
        # emulates it, slowly, and where vLLM refuses bfloat16
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16 else torch.float32
    return _DTYPES[name]


def emulated_bfloat16(device: torch.device) -> bool:
    """True where bfloat16 matrix multiplies have no hardware path: a CPU without AVX512 (oneDNN's bfloat16
    kernels need it; on an AVX2-only CPU torch emulates them).

    Why it matters: on such a CPU (an AVX2-only AMD EPYC, docs/BENCHMARKS.md) a bfloat16 GEMM ran 29x slower than
    a float32 one and the bfloat16 MOPD step 8x slower, so a `dtype: bfloat16` stage there is slower, not faster.
    """
    return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass(frozen=True)
class Placement:
    """Where a stage's models live and in which precision, resolved once per stage (`resolve_placement`).

    device: where the student trains and teachers score. compute_dtype: the precision forward passes compute
    in (and frozen models are held in). weights_dtype: the precision of the trained weights and optimizer state.
    teacher_device: the recipe's `teacher_device` (same | cpu | auto).
    """

    device: torch.device
    compute_dtype: torch.dtype
    weights_dtype: torch.dtype
    teacher_device: str

    def precision(self) -> AbstractContextManager:
        """The context a forward pass of the trained model runs in (autocast when the weights are wider)."""
        return compute_precision(self.device, self.compute_dtype, self.weights_dtype)


def resolve_placement(stage, recipe) -> Placement:
    """A stage's placement: its own `device`/`dtype`/`master_weights` when set, else the recipe's."""
    device = resolve_device(getattr(stage, "device", None) or recipe.device)
    compute = resolve_dtype(getattr(stage, "dtype", None) or recipe.dtype, device)
    weights = torch.float32 if (getattr(stage, "master_weights", None) or recipe.master_weights) == "float32" \
        else compute
    return Placement(device=device, compute_dtype=compute, weights_dtype=weights,
                     teacher_device=recipe.teacher_device)


def compute_precision(device: torch.device, compute: torch.dtype, weights: torch.dtype):
    """Autocast to the compute dtype when the trained weights are kept wider; otherwise nothing to do."""
    if weights == compute:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute)


def training_attention(model: torch.nn.Module, device: torch.device, compute: torch.dtype) -> torch.nn.Module:
    """Eager attention for a model that trains on CPU in bfloat16; any other model keeps its own choice.

    Why: torch's CPU flash-attention (`sdpa`) backward in bfloat16 is an order of magnitude slower than in
    float32, enough to cancel what bfloat16 matrix multiplies gain; eager attention made the bfloat16 mixed-
    precision MOPD step 1.4x faster than with `sdpa` (`benchmarks/precision_levers.py`, docs/BENCHMARKS.md).
    """
    if device.type == "cpu" and compute == torch.bfloat16 and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model
