"""The layout of a run directory, written down once: every module that writes or reads one names its files here.

    RUN/
      run.json            the runner's record: stage order, identities, status and wall time (RUN_JSON)
      recipe.yaml         the recipe as run (RECIPE_COPY)
      summary.json        the report's numbers (SUMMARY_JSON), beside report.md / report.html (REPORT_MD,
                          REPORT_HTML) and its figures (FIGURES)
      compare.md ...      `mopd compare`'s table, its numbers and plots (COMPARE_FILES)
      tracking/           experiment trackers' local stores (TRACKING)
      .superseded/        whatever a rerun moved aside, never deleted (SUPERSEDED)
      .mopd-probe-*       a Ray run's shared-filesystem probe files, removed when it ends (PROBE_PREFIX)
      <stage>/
        stage.json        the identity the directory was started under (STAGE_JSON)
        metrics.jsonl     one record per step (METRICS)
        preflight.json    a MOPD stage's teacher-student check (PREFLIGHT)
        samples/          transcripts (SAMPLES, `eval.transcripts`): eval-<step>.jsonl of every held-out eval,
                          train-<step>.jsonl of a sampling stage's rollouts every `log_samples` steps
        checkpoints/      resumable checkpoints (CHECKPOINTS)
        snapshots/<step>/ kept checkpoints (SNAPSHOTS)
        final/            the stage's output: an HF checkpoint + mopd.json (LINEAGE), or eval.json (EVAL_JSON)

A stage's directory sits beside these files, so no stage may take one of their names (`reserved_stage_name`).

Why one module: the names were string literals in the runner, the stages and the report, so a reader could not
tell which files make up a run, and renaming one meant finding every copy.
"""

from __future__ import annotations

RUN_JSON = "run.json"
RECIPE_COPY = "recipe.yaml"
SUMMARY_JSON = "summary.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES = (
    "reward.png", "reverse_kl.png", "entropy.png", "completion_len.png",
    "routing_share.png", "is_dropped.png", "teacher_nll.png",
)
COMPARE_FILES = ("compare.md", "compare.json", "compare_bars.png", "sample_efficiency.png")
TRACKING = "tracking"
SUPERSEDED = ".superseded"
STAGE_JSON = "stage.json"
METRICS = "metrics.jsonl"
PREFLIGHT = "preflight.json"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
FINAL = "final"
LINEAGE = "mopd.json"
EVAL_JSON = "eval.json"
PROBE_PREFIX = ".mopd-probe-"  # hidden: no stage name starts with a dot
SAMPLES = "samples"

# Every name the run directory itself uses beside the stages' directories.
RUN_FILES = frozenset({RUN_JSON, RECIPE_COPY, SUMMARY_JSON, REPORT_MD, REPORT_HTML, *FIGURES, *COMPARE_FILES,
                       TRACKING, SUPERSEDED})


def reserved_stage_name(name: str) -> str | None:
    """The run directory's own file that a stage named `name` would take the place of (a stage `run.json` would
    have its directory where run.json is written), or None. Compared without case: on a case-insensitive
    filesystem (macOS, Windows) `Run.JSON` is the same entry."""
    return next((n for n in sorted(RUN_FILES) if n.casefold() == name.casefold()), None)


# The most characters mopd adds to a stage's (or the recipe's) name in a name it derives from it:
# `.superseded/<stage>-step-<7+ digits>-unverified-<unix time>-<k>` (about 40), `.mopd.stage.<stage>.lock` (17),
# `runs/<recipe>-sweep`; with room to spare. A name plus this must fit the filesystem's longest file name.
DERIVED_NAME_EXTRA = 64
# The longest file name on the filesystems mopd meets (ext4, XFS, btrfs, tmpfs, APFS, NTFS): where the
# platform cannot say (`os.pathconf`), this is assumed.
NAME_MAX = 255
