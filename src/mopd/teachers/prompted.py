"""Prompted teachers: a model that scores the student's completions after its own system prompt and examples.

Why: context distillation. The same weights, given a domain's instruction and a few worked examples, are often a
much better teacher of that domain than without them, and need no training; distilling them into the bare model
on its own rollouts moves the instruction into the weights. A `prompted` stage writes its model with a
`teacher_prompt.json` (`models.prompting`), and wherever such a checkpoint is a teacher, each routed row is scored
as the teacher's rendering of the row's prompt followed by the student's completion tokens, unchanged
(`core.batch.with_prompts`). Both batches end in the same columns, so every score of the completion window lines
up with the student's batch (`core.batch.tail_aligned`); in-process teachers do this in `TeacherPanel`, teachers
on Ray actors or HTTP servers through `PromptedRemote`, so the same teacher gives the same scores anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..core.batch import RolloutBatch, tail_aligned, with_prompts
from ..models.prompting import PromptFormat, read_teacher_prompt

Reprompt = Callable[[RolloutBatch], RolloutBatch]


def reprompter(tokenizer, fmt: PromptFormat) -> Reprompt:
    """The batch as a teacher with format `fmt` sees it: each row's prompt re-rendered, its completion kept."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def view(batch: RolloutBatch) -> RolloutBatch:
        if len(batch.prompts) != batch.size:
            raise ValueError("a prompted teacher needs each row's prompt text (RolloutBatch.prompts)")
        return with_prompts(batch, [fmt.token_ids(tokenizer, p) for p in batch.prompts], pad)

    return view


def teacher_formats(checkpoints: Mapping[str, str], student_format: PromptFormat) -> dict[str, PromptFormat]:
    """Teacher name -> its prompt format, for the prompted teachers among `checkpoints` (directories)."""
    out = {}
    for name, ref in checkpoints.items():
        if (context := read_teacher_prompt(ref)) is not None:
            out[name] = student_format.with_context(context)
    return out


def prefix_tokens(tokenizer, student: PromptFormat, teacher: PromptFormat, prompts: list[str]) -> float:
    """How many more prompt tokens the teacher reads than the student, on average over `prompts`."""
    if not prompts:
        return 0.0
    extra = [len(teacher.token_ids(tokenizer, p)) - len(student.token_ids(tokenizer, p)) for p in prompts]
    return sum(extra) / len(extra)


@dataclass
class PromptedRemote:
    """A remote teacher (`teachers.remote.RemoteTeacher`) that is a prompted teacher: it is sent the re-rendered
    rows, and what it returns is put back in the student batch's columns."""

    inner: object  # a RemoteTeacher
    view: Reprompt

    def sampled(self, batch: RolloutBatch):
        wait = self.inner.sampled(self.view(batch))
        width = batch.input_ids_B_T.shape[1]
        return lambda: tail_aligned(wait(), width) * batch.completion_mask_B_T.to("cpu")

    def topk(self, batch: RolloutBatch, k: int, window: int):
        seen = self.view(batch)
        width = batch.input_ids_B_T.shape[1]
        wait = self.inner.topk(seen, k, min(window, seen.input_ids_B_T.shape[1]))

        def result():
            lp, ids, sampled = wait()
            return (tail_aligned(lp, window), tail_aligned(ids, window),
                    tail_aligned(sampled, width) * batch.completion_mask_B_T.to("cpu"))

        return result

    def logits(self, batch: RolloutBatch, keep: int):
        seen = self.view(batch)
        wait = self.inner.logits(seen, min(keep, seen.input_ids_B_T.shape[1]))
        return lambda: tail_aligned(wait(), keep)
