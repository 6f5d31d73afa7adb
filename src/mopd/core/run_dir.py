"""The layout of a run directory, written down once: every module that writes or reads one names its files here.

    RUN/
      run.json            the runner's record: stage order, identities, status and wall time (RUN_JSON)
      recipe.yaml         the recipe as run (RECIPE_COPY)
      summary.json        the report's numbers (SUMMARY_JSON), beside report.md / report.html
      .superseded/        whatever a rerun moved aside, never deleted (SUPERSEDED)
      <stage>/
        stage.json        the identity the directory was started under (STAGE_JSON)
        metrics.jsonl     one record per step (METRICS)
        preflight.json    a MOPD stage's teacher-student check (PREFLIGHT)
        samples/          transcripts (SAMPLES, `eval.transcripts`): eval-<step>.jsonl of every held-out eval,
                          train-<step>.jsonl of a sampling stage's rollouts every `log_samples` steps
        checkpoints/      resumable checkpoints (CHECKPOINTS)
        snapshots/<step>/ kept checkpoints (SNAPSHOTS)
        final/            the stage's output: an HF checkpoint + mopd.json (LINEAGE), or eval.json (EVAL_JSON)

Why one module: the names were string literals in the runner, the stages and the report, so a reader could not
tell which files make up a run, and renaming one meant finding every copy.
"""

from __future__ import annotations

RUN_JSON = "run.json"
RECIPE_COPY = "recipe.yaml"
SUMMARY_JSON = "summary.json"
SUPERSEDED = ".superseded"
STAGE_JSON = "stage.json"
METRICS = "metrics.jsonl"
PREFLIGHT = "preflight.json"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
FINAL = "final"
LINEAGE = "mopd.json"
EVAL_JSON = "eval.json"
SAMPLES = "samples"
