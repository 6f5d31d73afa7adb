"""Which rollout sampler a stage uses: the PyTorch sampler, or vLLM where a CUDA GPU and vllm are present.

Both return the same `RolloutBatch` (prompt left-padded, completion right-padded, per-token sampler logprobs), so
everything after sampling is unchanged. vLLM is imported only when chosen; `rollout_backend: vllm` on a machine
without CUDA or vllm is refused when the recipe is loaded (see recipe/resources.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from .sampler import sample


def vllm_unavailable_reason(*, cuda: bool | None = None, has_vllm: bool | None = None) -> str | None:
    """Why the vLLM backend cannot run here, or None when it can (arguments override detection, for tests)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if has_vllm is None:
        has_vllm = importlib.util.find_spec("vllm") is not None
    if not cuda:
        return "no CUDA device (vLLM needs a GPU)"
    if not has_vllm:
        return "vllm is not installed (pip install 'mopd[gpu]')"
    return None


def choose_backend(requested: str, *, cuda: bool | None = None, has_vllm: bool | None = None) -> str:
    """`torch` or `vllm` for a recipe's `rollout_backend` (auto: vllm when it can run here)."""
    if requested not in ("auto", "torch", "vllm"):
        raise ValueError(f"rollout_backend must be auto, torch or vllm, got {requested!r}")
    if requested == "torch":
        return "torch"
    reason = vllm_unavailable_reason(cuda=cuda, has_vllm=has_vllm)
    if requested == "vllm" and reason:
        raise ValueError(f"rollout_backend vllm: {reason}")
    return "torch" if reason else "vllm"


def rollout_sampler(backend: str, *, init_path: str | None, tokenizer, dtype, memory_fraction: float,
                    seed: int) -> Callable:
    """A callable with `sample`'s signature; the vLLM one syncs the student's weights on every call."""
    if backend == "torch":
        return sample
    from .vllm_backend import VLLMSampler  # lazy: vllm is an optional, GPU-only dependency

    if init_path is None:
        raise ValueError("the vLLM backend starts its engine from a checkpoint; this stage has no `init`")
    return VLLMSampler(init_path, tokenizer, dtype=dtype, memory_fraction=memory_fraction, seed=seed)
