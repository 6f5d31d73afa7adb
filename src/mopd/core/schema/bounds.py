"""The largest values a recipe may set: each above what any real recipe reaches, and at or below where mopd
would break or never finish. A value beyond one is a one-line schema error at its key, before any compute
(docs/RECIPES.md, "Limits", says the same in prose).

Why bounds and not only types: `steps: 1000000000000` is an integer, so it passed the schema and trained on for
ever; `seed: 18446744073709551616` passed and failed after the stages before it trained, with torch's overflow
message that does not say `seed`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# torch.manual_seed takes an unsigned 64-bit integer; `mopd compare` runs seed, seed+1, ..., so the last seed of
# a comparison must fit too (the recipe checks seed + seeds - 1).
SEED_MAX = 2**64 - 1
# Checkpoint directories are named step-<7 digits> and ordered as text, so step 10,000,000 would sort before
# step 9,999,999 and a resume would pick the wrong one. Ten million updates is ten times a long pretraining run.
STEPS_MAX = 9_999_999
# Prompts per step, and samples per prompt: the largest published RL and SFT steps are a few thousand prompts of
# at most a few hundred samples each.
BATCH_MAX = 65_536
GROUP_MAX = 4_096
# Tokens one completion may add: above every model's output limit (128k-256k tokens in 2026).
NEW_TOKENS_MAX = 2**20
# AdamW moves every weight by about `lr` per step whatever the gradient's scale, so lr = 1 already replaces each
# weight of a trained model (typically |w| < 0.1) every step; larger values only overflow.
LR_MAX = 1.0
# `mopd compare` / `mopd sweep` seeds: each is a whole run of every method; 1000 already gives intervals far
# narrower than any evaluation set resolves.
SEEDS_MAX = 1000

# Tokens of a tokenizer built from scratch (`tokenizer.vocab_size`): twice a 2026 model's vocabulary is far past
# anything a tiny model built here needs.
VOCAB_MAX = 524_288

Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Steps = Annotated[int, Field(gt=0, le=STEPS_MAX)]
