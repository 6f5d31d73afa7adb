"""Scalar-head models on a causal LM's backbone: a reward model (one score per sequence) and a PPO critic (one
value per token), each an HF class that `from_pretrained` reopens (`checkpoint.load_model` picks it from the
saved config's `architectures`).

Why HF's own classes: a reward model saved this way is a checkpoint any HF user opens with
`AutoModelForSequenceClassification`; HF's forward scores the last token that is not `pad_token_id` (so that id
is written into the config), mopd the last token of its left-padded rows, the EOS (`learner.reward_model.scores`:
the two differ when the pad token is the EOS, as SmolLM2's is). The backbone's weights come from the checkpoint; the
new head is initialised by HF from torch's generator (which the driver seeds), so a stage builds it identically
every time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

Head = Literal["sequence_classifier", "token_classifier"]
_AUTO = {"sequence_classifier": AutoModelForSequenceClassification, "token_classifier": AutoModelForTokenClassification}


def scalar_head_model(path: str | Path, head: Head, *, pad_token_id: int, dtype: torch.dtype) -> torch.nn.Module:
    """`path`'s backbone (a causal LM, or a reward model / critic) with a one-output `head`."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": the head, as intended
    try:
        model = _AUTO[head].from_pretrained(str(path), num_labels=1, pad_token_id=pad_token_id, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = pad_token_id
    return model
