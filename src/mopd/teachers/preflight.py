"""Teacher-student compatibility preflight: run once before a MOPD stage spends compute.

Two failure modes waste a whole MOPD run, and both are visible before the first step:
1. the teacher scores different token ids than the student samples (another vocabulary, other special-token
   ids): every per-token signal is then noise. Refused with `PreflightError` (one line).
   A different chat template is only warned about: the token ids still agree, but the teacher was trained on
   differently formatted prompts, so its scores of the student's prompts are off its own distribution.
2. the teacher is far from the student: the MOPD paper (arXiv 2606.30406) measured an initial per-token
   reverse KL of ~0.04 for a same-lineage teacher and ~0.19 for a foreign one whose distillation later
   collapsed. We measure the exact KL(pi_S || pi_T) over the full vocabulary at every completion position of
   student rollouts of the teacher's own domains, and warn above `kl_warn`.
A teacher that scores elsewhere (`teacher_backends`: a Ray actor or a server) ships token logprobs, not full
distributions, so its KL is the sampled-token estimate mean_t (log pi_S(y_t) - log pi_T(y_t)) over the same
student rollouts (unbiased for the per-token reverse KL, noisier than the exact sum); its tokenizer was checked
when it connected (`teachers.http.connect`) or from its files.
The result is written to <stage>/preflight.json and shown in the report.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.batch import RolloutBatch, tail_aligned
from ..core.divergence import categorical_kl, log_softmax_pair
from ..core.errors import StageError
from ..core.logprobs import token_logprobs
from ..envs import DomainLike, Problem
from ..envs.tool_domains import is_agentic
from ..models.forward import final_hidden, sequence_logits
from ..models.prompting import RAW, PromptFormat
from ..sampling.multi_turn import EpisodeRow, episode_rows, sample_episodes
from ..sampling.sampler import sample
from .offload import placed_on
from .prompted import prefix_tokens, reprompter

SPECIAL = ("bos", "eos", "pad", "unk")


class PreflightError(StageError):
    """A teacher the student cannot be distilled from; str() is the one line the CLI prints."""


@dataclass(frozen=True)
class RolloutSettings:
    """How the preflight samples the student: as the stage's first step would."""

    prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float


def _special_tokens(tokenizer) -> dict[str, tuple[str | None, int | None]]:
    return {k: (getattr(tokenizer, f"{k}_token", None), getattr(tokenizer, f"{k}_token_id", None)) for k in SPECIAL}


def check_tokenizers(student_tok, teacher_tok, label: str) -> list[str]:
    """Refuse a teacher whose vocabulary or special tokens differ from the student's; return warnings.

    Args:
        student_tok, teacher_tok: Hugging Face tokenizers.
        label: how the error names the pair, e.g. "stage 'student': teacher 't_add' (domain addition)".

    Returns:
        warnings (one line each): a chat template that differs from the student's.

    Raises:
        PreflightError: vocabulary (token -> id) or bos/eos/pad/unk (string or id) mismatch.
    """
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))
        only_t = sorted(set(tv) - set(sv))
        moved = sorted(k for k in set(sv) & set(tv) if sv[k] != tv[k])
        detail = (
            f"student {len(sv)} tokens, teacher {len(tv)}; {len(only_s)} only in the student "
            f"{only_s[:3]}, {len(only_t)} only in the teacher {only_t[:3]}, {len(moved)} with other ids"
        )
        raise PreflightError(
            f"{label}: vocabulary differs from the student's ({detail}); on-policy distillation needs the "
            "teacher to score the student's token ids"
        )
    ss, ts = _special_tokens(student_tok), _special_tokens(teacher_tok)
    bad = [f"{k}: student {ss[k]} vs teacher {ts[k]}" for k in SPECIAL if ss[k] != ts[k]]
    if bad:
        raise PreflightError(f"{label}: special tokens differ from the student's ({'; '.join(bad)})")
    warnings = []
    if getattr(student_tok, "chat_template", None) != getattr(teacher_tok, "chat_template", None):
        warnings.append(
            f"{label}: chat template differs from the student's (same token ids, but the teacher was trained "
            "on differently formatted prompts)"
        )
    return warnings


def student_rollouts(student, tokenizer, prompts: list[str], settings: RolloutSettings, generator: torch.Generator,
                     prompt_format: PromptFormat = RAW, episodes: list[EpisodeRow] | None = None) -> RolloutBatch:
    """The student's rollouts as its first step would make them: single-turn samples of `prompts`, or, for a
    teacher of tool-use domains, whole `episodes` (observations in the window, the completion mask on the
    model's tokens only, so the KL below is measured where training measures it)."""
    if episodes:
        batch, _ = sample_episodes(student, tokenizer, episodes, temperature=settings.temperature,
                                   top_p=settings.top_p, generator=generator, prompt_format=prompt_format)
        return batch
    return sample(student, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                  temperature=settings.temperature, top_p=settings.top_p, generator=generator,
                  prompt_format=prompt_format)


KL_ROWS = 4  # rollouts per forward of the preflight's exact KL
KL_BLOCK_BYTES = 16 * 2**20  # ... whose logits are made a block of positions at a time, at most this many bytes


@torch.no_grad()
def initial_reverse_kl(
    student, teacher, tokenizer, prompts: list[str], settings: RolloutSettings, generator: torch.Generator,
    prompt_format: PromptFormat = RAW, episodes: list[EpisodeRow] | None = None, rows: int = KL_ROWS,
    teacher_view: Callable[[RolloutBatch], RolloutBatch] | None = None,
) -> tuple[float, int]:
    """Exact per-token reverse KL(pi_S || pi_T), full vocabulary, on student rollouts of `prompts`.

        KL = mean over completion positions t of sum_v pi_S(v | y_<t) (log pi_S(v | y_<t) - log pi_T(v | y_<t))

    Computed `rows` rollouts at a time, over the positions that predict a completion token only, and from the two
    models' final hidden states a block of positions at a time (`KL_BLOCK_BYTES` of logits each): at Qwen3's
    151,936-token vocabulary a whole batch's logits of both models are gigabytes, and even 4 rows of 190
    positions held 2.5 GB at once (issue 35); the sum is the same up to float rounding.

    Returns:
        (kl, number of completion tokens it averages over).
    """
    batch = student_rollouts(student, tokenizer, prompts, settings, generator, prompt_format, episodes)
    # a teacher kept on another device (e.g. offloaded to CPU) scores there; the KL is taken on the student's
    t_dev = next(teacher.parameters()).device
    K = batch.input_ids_B_T.shape[1] - batch.first_completion_column + 1  # from the last prompt column on
    total, tokens = 0.0, 0
    for r in range(0, batch.input_ids_B_T.shape[0], rows):
        ids_B_T, attn_B_T = batch.input_ids_B_T[r : r + rows], batch.attention_mask_B_T[r : r + rows]
        # position j of the last K predicts column T - K + j + 1: pair positions [:-1] with the mask's last K - 1
        mask_B_W = batch.completion_mask_B_T[r : r + rows, ids_B_T.shape[1] - K + 1 :]
        if not int(mask_B_W.sum()):
            continue
        hidden_s, head_s = final_hidden(student, ids_B_T, attn_B_T, keep=K)
        # a prompted teacher reads its own prompt before the same completions: its last K positions line up
        seen = teacher_view(batch.select(torch.arange(r, min(r + rows, batch.size)))) if teacher_view else None
        t_ids, t_attn = (seen.input_ids_B_T, seen.attention_mask_B_T) if seen is not None else (ids_B_T, attn_B_T)
        hidden_t, head_t = final_hidden(teacher, t_ids.to(t_dev), t_attn.to(t_dev), keep=K)
        hidden_t = tail_aligned(hidden_t, K)
        vocab = head_s(hidden_s[:1, :1]).shape[-1]
        block = max(1, KL_BLOCK_BYTES // (4 * ids_B_T.shape[0] * vocab))
        for a in range(0, K - 1, block):
            b = min(a + block, K - 1)
            # the learner's full reverse KL loss (`learner.objectives.full_reverse_kl_loss`), term for term
            logp, logq = log_softmax_pair(head_s(hidden_s[:, a:b]), head_t(hidden_t[:, a:b]).to(hidden_s.device))
            m = mask_B_W[:, a:b]
            total += float((categorical_kl(logp, logq) * m).sum())
            tokens += int(m.sum())
    return (total / tokens if tokens else 0.0), tokens


@torch.no_grad()
def sampled_reverse_kl(
    student, score: Callable[[RolloutBatch], torch.Tensor], tokenizer, prompts: list[str],
    settings: RolloutSettings, generator: torch.Generator, prompt_format: PromptFormat = RAW,
    episodes: list[EpisodeRow] | None = None, foreign: Any = None,
) -> tuple[float, int, dict[str, Any]]:
    """Sampled-token estimate of the per-token reverse KL(pi_S || pi_T) on student rollouts of `prompts`, for a
    teacher known only through `score(batch)` -> log pi_T(y_t) [B, T] (a remote teacher):

        KL_hat = mean over completion positions t of (log pi_S(y_t | y_<t) - log pi_T(y_t | y_<t)),  y_t ~ pi_S

    A teacher of another tokenizer (`foreign`, a `cross_tokenizer.ForeignTeacher`) is compared over its aligned
    chunks: log pi_T of a chunk against the sum of its student tokens' log pi_S, over the tokens in chunks.

    Returns:
        (estimate, number of completion tokens it averages over, the alignment's coverage for `foreign`).
    """
    batch = student_rollouts(student, tokenizer, prompts, settings, generator, prompt_format, episodes)
    ids, attn = batch.input_ids_B_T, batch.attention_mask_B_T
    student_lp = torch.cat([token_logprobs(sequence_logits(student, ids[r : r + KL_ROWS], attn[r : r + KL_ROWS]),
                                           ids[r : r + KL_ROWS]) for r in range(0, ids.shape[0], KL_ROWS)])
    teacher_lp = score(batch.to("cpu")).to(student_lp.device)
    mask = batch.completion_mask_B_T
    coverage: dict[str, Any] = {}
    if foreign is not None:
        mask = mask * (foreign.chunk_ids(batch).to(mask.device) >= 0)
        coverage = foreign.alignment_report(batch)
    return float(((student_lp - teacher_lp) * mask).sum() / mask.sum().clamp(min=1)), int(mask.sum()), coverage


def domain_problems(
    domains: Sequence[DomainLike], n: int, rng: random.Random, exclude: Mapping[str, frozenset[str]]
) -> list[Problem]:
    """`n` training problems spread evenly over `domains` (never a held-out eval prompt)."""
    out = []
    for i in range(n):
        d = domains[i % len(domains)]
        out += d.sample_train(rng, 1, exclude=exclude.get(d.name, frozenset()))
    return out


def run_preflight(
    *,
    stage: str,
    student,
    tokenizer,
    student_tok,
    teachers: Mapping[str, Any],
    teacher_toks: Mapping[str, Any],
    teacher_of_domain: Mapping[str, str],
    domains: Sequence[DomainLike],
    settings: RolloutSettings,
    kl_warn: float,
    seed: int,
    exclude: Mapping[str, frozenset[str]],
    warn: Callable[[str], None],
    compute_device: torch.device | None = None,
    prompt_format: PromptFormat = RAW,
    remote: Mapping[str, Callable[[RolloutBatch], torch.Tensor]] | None = None,
    teacher_formats: Mapping[str, PromptFormat] | None = None,
    foreign: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check every teacher of a MOPD stage; returns the JSON-ready result (also passed through `warn`).

    Tokenizers (`student_tok` against each of `teacher_toks`, as saved with the checkpoints) are checked for
    all teachers first, so a refusal costs no sampling; then, per teacher, the student samples (with
    `tokenizer` and `prompt_format`, as training does) `settings.prompts` prompts of that teacher's domains and the initial
    reverse KL is measured.
    `compute_device` is the teacher panel's: an offloaded teacher (kept in host memory) is moved there to score,
    as in training, rather than running its forward pass on the host CPU.
    `remote`: teachers scored elsewhere, name -> score(batch) (log pi_T of each token): their KL is the
    sampled-token estimate (`sampled_reverse_kl`), measured after the in-process teachers'. Those of another
    tokenizer are also in `foreign` (name -> `cross_tokenizer.ForeignTeacher`): their estimate is over aligned
    chunks, and their alignment's coverage is reported (`cross_tokenizer.describe`).
    Deterministic in `seed`; it draws from its own generators, so training is unaffected.
    """
    warnings: list[str] = []
    formats = dict(teacher_formats or {})
    for teacher in sorted(teachers):
        routed = sorted(d for d, t in teacher_of_domain.items() if t == teacher)
        label = f"stage {stage!r}: teacher {teacher!r} ({', '.join(routed)})"
        warnings += check_tokenizers(student_tok, teacher_toks[teacher], label)
    results: dict[str, Any] = {}
    remote = remote or {}
    for i, teacher in enumerate([*sorted(teachers), *sorted(remote)]):
        routed = [d for d in domains if teacher_of_domain.get(d.name) == teacher]
        if not routed:
            continue
        rng = random.Random(f"mopd-preflight:{seed}:{teacher}")
        problems = domain_problems(routed, settings.prompts, rng, exclude)
        prompts = [p.prompt for p in problems]
        # a teacher of tool-use domains is measured on whole episodes, as training samples them
        episodes = (episode_rows(problems, {d.name: d for d in routed}, settings.max_new_tokens,
                                 prompt_format.chat_template) if any(is_agentic(d) for d in routed) else None)
        # wrapped into torch's unsigned 64-bit range: unchanged for every seed below 1.8e13
        gen = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**64)
        coverage: dict[str, Any] = {}
        if teacher in remote:
            kl, tokens, coverage = sampled_reverse_kl(student, remote[teacher], tokenizer, prompts, settings, gen,
                                                      prompt_format, episodes, (foreign or {}).get(teacher))
        else:
            view = reprompter(tokenizer, formats[teacher]) if teacher in formats else None
            with placed_on(teachers[teacher], compute_device) as model:
                kl, tokens = initial_reverse_kl(student, model, tokenizer, prompts, settings, gen, prompt_format,
                                                episodes, teacher_view=view)
        flagged = kl > kl_warn
        results[teacher] = {"domains": [d.name for d in routed], "reverse_kl": kl, "tokens": tokens, "warn": flagged}
        if teacher in formats:  # a prompted teacher: how much longer its prompt is than the student's
            results[teacher]["prompt_prefix_tokens"] = prefix_tokens(tokenizer, prompt_format, formats[teacher],
                                                                     prompts)
        if teacher in remote:
            results[teacher]["estimate"] = "sampled-token" + (" over aligned chunks" if coverage else "")
        if coverage:
            results[teacher]["cross_tokenizer"] = coverage
        if coverage and coverage["aligned_text_frac"] == 0:  # its KL of 0 over no text is no sign of agreement
            warnings.append(
                f"stage {stage!r}: teacher {teacher!r} aligns none of the student's completion text "
                f"({coverage['unaligned_tokens']} tokens whose text its tokenizer does not reproduce): it gives "
                "those rows no distillation signal; check that its tokenizer can write the domains' characters")
        if flagged:
            how = " (sampled-token estimate)" if teacher in remote else ""
            warnings.append(
                f"stage {stage!r}: teacher {teacher!r} starts far from the student: per-token reverse KL{how} "
                f"{kl:.3f} > kl_warn {kl_warn:g} " + ("(a prompted teacher: its prompt moves it away from the bare "
                                                      "student by design; watch the curves)" if teacher in formats
                                                      else "(a foreign or drifted teacher; distillation may collapse)")
            )
    for w in warnings:
        warn(w)
    return {
        "stage": stage,
        "kl_warn": kl_warn,
        "prompts": settings.prompts,
        "tokenizer": "same vocabulary and special tokens" + (
            f"; cross-tokenizer: {', '.join(sorted(foreign))}" if foreign else ""),
        "teachers": results,
        "warnings": warnings,
    }
