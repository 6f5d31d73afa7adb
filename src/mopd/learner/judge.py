"""A causal LM as judge (LLM-as-judge, RLAIF): the reward `{judge: MODEL, rubric: TEXT}`.

What the score is, honestly: the judge reads `rubric + prompt` (rendered with its own prompt format) and the
score of a completion y is its per-token geometric-mean probability under the judge,

    judge(y) = exp( mean_{t in y, EOS} log p_judge(y_t | rubric, prompt, y_<t) )   in (0, 1]

i.e. how much the completion looks like what the judge itself would write after the rubric. It is not a yes/no
verdict: a tiny character model has never seen a question about a completion, so it cannot answer one, but it
can say how typical an answer is of what it learned; a judge trained on well-styled answers (an SFT stage on
the `style` domain) thus scores styled answers high. With a real instruction-tuned LM and a rubric such as
"Answer politely and briefly.", the same score is a likelihood-based judge (a proxy with the usual biases of
likelihood: it favours the judge's own phrasing). Scoring an answer's length away is avoided by the mean (not
the sum) over its tokens.
"""

from __future__ import annotations

import torch

from ..envs import Problem
from ..models.prompting import RAW, PromptFormat
from .preference import pair_logprobs
from .rollout import RewardFn
from .supervised import supervised_batch


@torch.no_grad()
def judge_scores(judge, tokenizer, rows: list[Problem], completions: list[str], rubric: str,
                 prompt_format: PromptFormat = RAW) -> torch.Tensor:
    """The judge score of the module docstring for each (row's prompt, completion): [B] in (0, 1]."""
    judged = [Problem(prompt=rubric + p.prompt, answer=c, domain=p.domain, difficulty=p.difficulty)
              for p, c in zip(rows, completions, strict=True)]
    dev = next(judge.parameters()).device
    ids, attn, target = (x.to(dev) for x in supervised_batch(tokenizer, judged, loss_on_prompt=False,
                                                             prompt_format=prompt_format))
    mean_logprob_B = pair_logprobs(judge, ids, attn, target, length_normalized=True, logit_chunk=None)
    return mean_logprob_B.float().exp()


def judge_reward(judge, tokenizer, rubric: str, prompt_format: PromptFormat = RAW) -> RewardFn:
    """A stage's reward from a frozen judge, with the judge's own tokenizer and rendering."""
    return lambda rows, completions: judge_scores(judge, tokenizer, rows, completions, rubric, prompt_format).tolist()
