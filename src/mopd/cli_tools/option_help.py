"""The `--help` texts of the options several `mopd` commands share (kept here so that `cli.py` holds the
commands themselves), and the one pass that makes every help text print as written (`escape_markup`)."""

import inspect

import typer
from rich.markup import escape
from typer.models import ParameterInfo

from ..core.schema import EvalSettings

THREADS_HELP = ("torch CPU threads (default: torch's choice, one per core). Use 1 per process when several "
                "recipes share a few cores: their OpenMP threads otherwise wait on each other. Results are "
                "reproducible for a given thread count")

LOG_HELP = ("also send every metric to this experiment tracker (repeatable): tensorboard, wandb, trackio, mlflow; "
            "adds to the recipe's `logging:` (each needs its extra: pip install 'mopd[tensorboard]')")

VARIANTS_LOG_HELP = LOG_HELP + "; every method, point and seed logs to it (each run directory its own tracker run)"

EXECUTOR_HELP = ("local: stages one after another in this process; ray: each stage whose parents finished as a Ray "
                 "task with its `resources`, independent stages at the same time (needs mopd[ray]; default: the "
                 "recipe's `executor`, local)")
ADDRESS_HELP = ("--executor ray: the Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto; default: a local "
                "instance); one that does not answer as a Ray head within 30 s ($MOPD_RAY_CONNECT_TIMEOUT) is "
                "refused; the run directory must be on a filesystem every node sees")

SCALE_HELP = ("run the recipe at a reduced scale, 0 < S <= 1 (a quick look; the tests): steps, batch sizes and "
              "held-out sets times S, each with a small floor; sets the recipe's `scale:`; default run directory "
              "runs/<name>-scale<S>")

VARIANTS_EXECUTOR_HELP = ("local: the {what} one after another in this process; ray: each as a Ray task with its "
                          "stages' largest `resources`, as many at once as the cluster holds (needs mopd[ray]); "
                          "inside each, stages run as the recipe's `executor` says{tail}")

COMPARE_EXECUTOR_HELP = VARIANTS_EXECUTOR_HELP.format(
    what="seeds", tail="; with one seed, ray runs the stages (the methods) as Ray tasks, as `mopd run` does")
SWEEP_EXECUTOR_HELP = VARIANTS_EXECUTOR_HELP.format(what="points", tail="")

SEEDS_HELP = ("run every method for N seeds (the recipe's seed, seed+1, ...), each in OUT/seed-<s>/, and report "
              "means with 95% intervals (default: the recipe's `seeds`, 1)")

# `mopd eval`'s options: the defaults are the recipe's `eval:` defaults, named from the schema
_EVAL = {name: field.default for name, field in EvalSettings.model_fields.items()}
EVAL_SIZE_HELP = f"held-out prompts per domain (default {_EVAL['size']}, or the recipe's)"
EVAL_TOKENS_HELP = ("greedy tokens per prompt, every domain (default: the domain's own, else "
                    f"{_EVAL['max_new_tokens']} or the recipe's)")
EVAL_BATCH_HELP = f"prompts per forward batch (default {_EVAL['batch_size']})"
HELD_OUT_SEED_HELP = f"the held-out set's seed (default {_EVAL['seed']}, as in recipes)"
CHAT_TEMPLATE_HELP = ("auto: the tokenizer's chat template if it has one; none: raw prompts (default: auto, or the "
                      "recipe's)")


def escape_markup(app: typer.Typer) -> None:
    """Escape, once, every text typer renders as rich markup: the app's help, each command's help (its docstring)
    and epilog, each argument's and option's help.

    Why: in rich markup `[ray]` is a style tag, so `pip install 'mopd[ray]'` printed as `pip install 'mopd'`,
    and the extra a user needs vanished from the help. Escaping where the commands are registered, rather than in
    each text, covers every command and option added later too; no help text uses markup on purpose."""
    app.info.help = _escaped(app.info.help)
    for command in app.registered_commands:
        command.help = _escaped(command.help or inspect.getdoc(command.callback))
        command.epilog = _escaped(command.epilog)
        for param in inspect.signature(command.callback).parameters.values():
            if isinstance(param.default, ParameterInfo):
                param.default.help = _escaped(param.default.help)


def _escaped(text: object) -> object:
    return escape(text) if isinstance(text, str) else text
