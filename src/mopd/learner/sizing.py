"""The `auto` settings of a sampling stage's step: micro-batch rows, logit blocks, sorting by length and the
teachers' shared prefill, chosen from the model shapes, the batch and a memory budget.

Why: at a real vocabulary the step's memory and time turn on these knobs, and each spends one for the other
(issue 35: at Qwen3's vocabulary, a 42M student and a 97M teacher, the old defaults held 6.5 GB of logits, the
hand-tuned settings 2.7 GB but ran 10% slower). A user should not have to know which to turn. The choice:

- Logits. When a step's logits ([rows, K, V] float32) are small (`ONE_BLOCK_BYTES`), one block: the unchunked
  computation, op for op (the tiny recipes are unchanged). Otherwise the advantage objectives (`sampled`, `grpo`)
  score every position of a micro-batch at once, a block of vocabulary columns at a time (`core.vocab_blocks`:
  the head's GEMMs keep all the rows, so no time is lost to small blocks); the full-distribution objectives cut
  positions into blocks of about `BLOCK_ROWS` rows x positions (fewer rows than that slows the head's GEMMs: 45
  against 216 GFLOP/s for the weight gradient at 32 against 2,048 rows on 2 Xeon cores).
- Micro-batches. The whole batch a pass unless its saved activations would pass `ACTIVATION_BYTES` (a deep
  model's activations are most of its step's memory); then as many rows a pass as stay under it, balanced, and
  fewer again when the estimated peak would pass the budget. Splitting a batch whose activations are small
  saves nothing and changes float rounding (the tiny recipes keep the whole batch, and their numbers).
- `micro_batch_by_length` when there are several micro-batches; the shared prefill when a step's groups share at
  least `SHARED_PREFILL_TOKENS` prompt tokens (below that the KV-cache copies cost about what they save).

The estimate is deliberately simple (weights, AdamW state, saved activations per token, logit blocks, the
sampler's KV cache) and is printed with the choice, so a user can see what it assumed.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ONE_BLOCK_BYTES = 64 * 2**20  # a step's whole logits below this: one block (the unchunked computation)
BLOCK_ROWS = 512  # rows x positions of a block of positions' logits (the full-distribution objectives)
# the saved activations of one pass: at most about this much (fewer rows a pass frees more memory than the
# GEMMs lose speed: SmolLM2-135M, 30 layers, peaked at 8.9-10.3 GB with 8 rows a pass, 6.0 GB with 4, 4.3 GB
# with 1, at the same step time)
ACTIVATION_BYTES = {"cpu": 256 * 2**20, "cuda": 4 * 2**30}
SHARED_PREFILL_TOKENS = 4096  # prompt tokens a step's groups must share for the shared prefill to pay
RUNTIME_BYTES = 600 * 2**20  # the interpreter, torch and transformers before any model
VOCAB_OBJECTIVES = ("sampled", "grpo")  # need only the sampled tokens' scores: vocabulary blocks


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its vocabulary, width, depth, MLP width, KV width and bytes."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    kv_width: int
    weight_bytes: int  # all parameters
    trained: int  # parameters with a gradient (0 for a teacher)
    dtype_bytes: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = getattr(inner, "config", None)
        hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        head_dim = int(getattr(cfg, "head_dim", 0) or (hidden // heads if hidden else 0))
        params = list(model.parameters())
        return cls(vocab=int(getattr(cfg, "vocab_size", 0) or 0), hidden=hidden,
                   layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
                   intermediate=int(getattr(cfg, "intermediate_size", 0) or 4 * hidden),
                   kv_width=int(getattr(cfg, "num_key_value_heads", heads) or heads) * head_dim,
                   weight_bytes=sum(p.numel() * p.element_size() for p in params),
                   trained=sum(p.numel() for p in params if p.requires_grad),
                   dtype_bytes=params[0].element_size() if params else 4)


@dataclass(frozen=True)
class StepShape:
    """A step as the first one is: its rows, the prompt columns, the completion limit, the group size."""

    rows: int
    prompt_columns: int
    max_new_tokens: int
    group_size: int

    @property
    def columns(self) -> int:
        return self.prompt_columns + self.max_new_tokens


@dataclass(frozen=True)
class Sizing:
    micro_batch_size: int | None  # None: the whole batch
    logit_chunk: int | None  # positions per block (None: one block)
    vocab_block: int | None  # vocabulary columns per block (the advantage objectives; None: position blocks)
    by_length: bool
    shared_prefill: bool
    estimated_peak_bytes: int
    budget_bytes: int
    chosen: tuple[str, ...]  # the settings that were `auto`

    def line(self) -> str:
        """The one line a stage prints at its start."""
        if self.vocab_block is not None:
            logits = f"logits in blocks of {self.vocab_block} vocabulary columns"
        elif self.logit_chunk is None:
            logits = "logits in one block"
        else:
            logits = f"logit blocks of {self.logit_chunk} positions"
        rows = "the whole batch a pass" if self.micro_batch_size is None else f"micro-batches of {self.micro_batch_size} rows"
        extra = "".join([", by length" if self.by_length else "", ", shared teacher prefill" if self.shared_prefill else ""])
        return (f"{logits}, {rows}{extra}: est. peak {self.estimated_peak_bytes / 2**30:.1f} GiB of a "
                f"{self.budget_bytes / 2**30:.1f} GiB budget")

    def record(self) -> dict:
        return asdict(self)


def available_bytes(device: torch.device) -> int:
    """Free memory now: the device's on a GPU, else the machine's (`MemAvailable`; a container's cgroup limit is
    not read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def activation_bytes_per_token(m: ModelShape) -> int:
    """What a float32 decoder saves for backward per token: about 18 hidden-wide and 8 MLP-wide vectors a layer
    (norms, projections, rotary q/k, attention output, gate/up and their activations; measured: SmolLM2-135M
    2.9 MB a token, the issue-35 student 170 KB)."""
    return m.layers * (18 * m.hidden + 8 * m.intermediate) * 4


def estimate_peak(student: ModelShape, teachers: list[ModelShape], step: StepShape, micro: int, block_bytes: int) -> int:
    """Bytes at the step's peak: the runtime, the student's weights, gradients and AdamW moments, the teachers'
    weights, the sampler's KV cache, one micro-batch's saved activations and a teacher's transient ones, and the
    logit blocks."""
    T = step.columns
    training = student.weight_bytes + student.trained * (4 + 8)
    teacher_weights = sum(t.weight_bytes for t in teachers)
    kv_cache = step.rows * T * student.layers * 2 * student.kv_width * student.dtype_bytes
    sampler_logits = 4 * step.rows * student.vocab * 4
    activations = micro * T * activation_bytes_per_token(student)
    widest = max(teachers, key=lambda t: t.hidden, default=None)
    teacher_pass = 0 if widest is None else micro * T * (5 * widest.hidden + 2 * widest.intermediate) * 4
    return (RUNTIME_BYTES + training + teacher_weights + max(kv_cache + sampler_logits, activations + teacher_pass
                                                            + block_bytes))


def choose_sizing(
    settings, objective: str, student: ModelShape, teachers: list[ModelShape], step: StepShape,
    device_type: str, budget_bytes: int, local_teachers: bool = True,
) -> Sizing:
    """The step's settings: each one the recipe set (a number, null, true or false) as set, each `auto` chosen.

    `settings`: the stage (its `micro_batch_size`, `logit_chunk`, `micro_batch_by_length` and, for mopd,
    `teacher_shared_prefill`); `objective`: the stage's (`grpo` for the stages without teachers)."""
    chosen = []
    K = step.max_new_tokens + 1
    V = max([student.vocab, *(t.vocab for t in teachers)])

    micro: int | None
    if settings.micro_batch_size == "auto":
        chosen.append("micro_batch_size")
        per_row = max(1, activation_bytes_per_token(student) * step.columns)
        rows = max(1, min(step.rows, ACTIVATION_BYTES.get(device_type, ACTIVATION_BYTES["cpu"]) // per_row))
        micro = rows
    else:
        micro = settings.micro_batch_size
    rows_per_pass = step.rows if micro is None else min(micro, step.rows)

    def logits_for(rows: int) -> tuple[int | None, int | None, int]:
        """(logit_chunk, vocab_block, bytes of the blocks) for micro-batches of `rows` rows."""
        if settings.logit_chunk != "auto":
            chunk = settings.logit_chunk
            n = K if chunk is None else min(chunk, K)
            return chunk, None, 6 * rows * n * V * 4
        if rows * K * V * 4 <= ONE_BLOCK_BYTES:
            return None, None, 3 * rows * K * V * 4
        if objective in VOCAB_OBJECTIVES:
            block = min(8192, max(512, _pow2_floor(2**21 / (rows * K))))
            fallback = max(1, BLOCK_ROWS // rows)  # a head that is not a plain projection: position blocks
            return fallback, block, 4 * rows * K * block * 4
        chunk = max(1, min(K - 1, BLOCK_ROWS // rows))
        return chunk, None, 6 * rows * chunk * V * 4

    if settings.logit_chunk == "auto":
        chosen.append("logit_chunk")
    chunk, vocab_block, block_bytes = logits_for(rows_per_pass)
    peak = estimate_peak(student, teachers, step, rows_per_pass, block_bytes)
    if settings.micro_batch_size == "auto":  # fewer rows a pass until the estimate fits (at least one row)
        while rows_per_pass > 1 and peak > budget_bytes:
            rows_per_pass = max(1, rows_per_pass // 2)
            chunk, vocab_block, block_bytes = logits_for(rows_per_pass)
            peak = estimate_peak(student, teachers, step, rows_per_pass, block_bytes)
        passes = math.ceil(step.rows / rows_per_pass)
        rows_per_pass = math.ceil(step.rows / passes)  # balanced: 16 rows in passes of 8 and 8, not 12 and 4
        micro = None if passes == 1 else rows_per_pass
        chunk, vocab_block, block_bytes = logits_for(rows_per_pass)
        peak = estimate_peak(student, teachers, step, rows_per_pass, block_bytes)

    by_length = settings.micro_batch_by_length
    if by_length == "auto":
        chosen.append("micro_batch_by_length")
        by_length = micro is not None and micro < step.rows
    prefill = getattr(settings, "teacher_shared_prefill", False)
    if prefill == "auto":
        chosen.append("teacher_shared_prefill")
        shared_tokens = step.prompt_columns * (step.group_size - 1) * (step.rows // max(1, step.group_size))
        prefill = local_teachers and step.group_size >= 2 and shared_tokens >= SHARED_PREFILL_TOKENS
    return Sizing(micro_batch_size=micro, logit_chunk=chunk, vocab_block=vocab_block, by_length=bool(by_length),
                  shared_prefill=bool(prefill), estimated_peak_bytes=int(peak), budget_bytes=int(budget_bytes),
                  chosen=tuple(chosen))
