"""Each stage kind as a short composition of the learner parts; `run_stage` picks the kind's runner.

A new stage kind is a schema class in `core/schema/` (`stages.py`, `mopd.py`, ...) and one entry of `RUNNERS` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..core.run_dir import EVAL_JSON, FINAL, METRICS
from ..core.schema import EvalStage, PretrainStage, fixed_logit_chunk, fixed_micro_batch
from ..eval.transcripts import samples_path, write_transcripts
from ..learner.supervised import supervised_loss
from ..models.checkpoint import load_tokenizer, publish_dir, write_json_atomic
from ..models.prompting import with_pad_token
from .baselines import run_offpolicy
from .dpo import run_dpo
from .driver import eval_metrics, train
from .lineage import final_lineage
from .loading import load_placed
from .merge import run_merge
from .mopd import run_mopd
from .ppo import run_ppo
from .problems import problem_source, step_rng
from .prompted import run_prompted
from .rejection import run_rejection_sampling
from .resolved import ResolvedStage
from .reward_model import run_reward_model
from .rl import run_rl
from .samples import EvalTranscripts
from .start import starting_model


def run_supervised(ctx: ResolvedStage) -> Path:
    """pretrain (NLL on prompt and answer: a corpus) and sft (NLL on the answer only)."""
    s = ctx.settings
    source = problem_source(ctx)
    on_prompt = isinstance(s, PretrainStage)

    def loss_fn(model, step):
        problems = source.draw(step_rng(ctx.seed, step), s.batch_size)
        return supervised_loss(model, ctx.tokenizer, problems, loss_on_prompt=on_prompt,
                               micro_batch_size=fixed_micro_batch(s), prompt_format=ctx.prompt_format,
                               logit_chunk=fixed_logit_chunk(s))

    return train(ctx, starting_model(ctx), loss_fn)


def run_eval(ctx: ResolvedStage) -> Path:
    """Score checkpoints on the held-out sets, each with its own tokenizer and the recipe's prompt rendering:
    a Hugging Face model scored with the recipe's character tokenizer would be scored on garbage ids."""
    s: EvalStage = ctx.settings
    results = {}
    records: list[dict] = []  # every model's transcripts, each record naming its model: one eval-0000000.jsonl
    for ref in s.models:
        path = ctx.model_refs[ref]
        model = load_placed(ctx, path).eval()
        tokenizer = with_pad_token(load_tokenizer(path))
        sink = EvalTranscripts(ctx, model, tokenizer, 0, extra={"model": ref})
        results[ref] = eval_metrics(ctx, model, tokenizer, ctx.rendering.format_for(tokenizer), sink=sink)
        records += [r for r in sink.records if not s.domains or r["domain"] in s.domains]
        if s.domains:
            results[ref] = {d: v for d, v in results[ref].items() if d in s.domains}
    write_transcripts(samples_path(ctx.stage_dir, "eval", 0), records)
    (ctx.stage_dir / METRICS).write_text(json.dumps({"step": 0, "eval": results}) + "\n")
    return publish_dir(ctx.stage_dir / FINAL, lambda tmp: write_json_atomic(tmp / EVAL_JSON, results),
                       final_lineage(ctx, 0, {"eval": results}))


RUNNERS: dict[str, Callable[[ResolvedStage], Path]] = {
    "pretrain": run_supervised,
    "sft": run_supervised,
    "rlvr": run_rl,
    "mix_rl": run_rl,
    "cascade_rl": run_rl,
    "offpolicy_ft": run_offpolicy,
    "mopd": run_mopd,
    "dpo": run_dpo,
    "rejection_sampling": run_rejection_sampling,
    "reward_model": run_reward_model,
    "ppo": run_ppo,
    "merge": run_merge,
    "eval": run_eval,
    "prompted": run_prompted,
    "model": run_prompted,
}


def run_stage(ctx: ResolvedStage) -> Path:
    """Run one stage to completion (resuming if it was interrupted); returns its final checkpoint or output."""
    return RUNNERS[ctx.settings.kind](ctx)
