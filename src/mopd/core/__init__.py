"""The bottom layer: what every other layer shares (the rollout batch, token logprobs, the recipe schema, the
recipe error, the teacher-scoring protocol). It imports nothing else of mopd."""
