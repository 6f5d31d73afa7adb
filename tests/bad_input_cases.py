"""The bad-input corpus (issue 15): recipes and command lines a hostile or unlucky user writes, each with the one
line mopd must answer. `tests/test_bad_input_corpus.py` runs every case through the CLI's entry function.

A case edits the valid recipe `BASE` (its line numbers are what the expected messages name) by replacing one
piece of text (`sub`), or replaces the whole file (`text`). `line` is the 1-based line the message must name (None
where the mistake has no line: an empty file, a missing key); `says` is a fragment of the message.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

BASE = textwrap.dedent(
    """\
    name: corpus
    seed: 0
    domains: [addition, reversal]
    eval: {size: 4, max_new_tokens: 4}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
        steps: 4
        batch_size: 4
      teacher_add:
        kind: rlvr
        init: base
        domains: [addition]
        steps: 2
        batch_size: 2
        group_size: 2
      teacher_rev:
        kind: rlvr
        init: base
        domains: [reversal]
        steps: 2
        batch_size: 2
        group_size: 2
      student:
        kind: mopd
        init: base
        teachers: {addition: teacher_add, reversal: teacher_rev}
        steps: 2
        batch_size: 2
        group_size: 2
    """
)


@dataclass(frozen=True)
class Case:
    id: str
    old: str | None  # text of BASE to replace (None: `new` is the whole file)
    new: str
    line: int | None
    says: str
    legal: bool = False  # a legal input: it must load, and exit 0

    def text(self) -> str:
        if self.old is None:
            return self.new
        assert BASE.count(self.old) >= 1, f"case {self.id}: {self.old!r} is not in BASE"
        return BASE.replace(self.old, self.new, 1)


def sub(id: str, old: str, new: str, line: int | None, says: str) -> Case:
    return Case(id, old, new, line, says)


def text(id: str, new: str, line: int | None, says: str) -> Case:
    return Case(id, None, new, line, says)


def legal(id: str, old: str, new: str) -> Case:
    return Case(id, old, new, None, "", legal=True)


TEACH = "    teachers: {addition: teacher_add, reversal: teacher_rev}\n"
STYLE = BASE.replace("domains: [addition, reversal]", "domains: [addition, reversal, style]")  # a judged domain
BASE_MODEL = "    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}\n"

# 9 levels of 10 aliases: 10^9 values once expanded, from ten short lines (before BASE: line 1 is `a0`)
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))

CASES: list[Case] = [
    # ----- the file itself
    text("empty file", "", None, "a recipe is a mapping"),
    text("only a comment", "# nothing here\n", None, "a recipe is a mapping"),
    text("a list, not a mapping", "- name: x\n- stages: {}\n", None, "a recipe is a mapping"),
    text("a scalar", "just words\n", None, "a recipe is a mapping"),
    text("unclosed bracket", BASE.replace("[addition, reversal]", "[addition, reversal"), 4, "invalid YAML"),
    text("tab indentation", BASE.replace("    kind: pretrain", "\tkind: pretrain"), 7, "invalid YAML"),
    text("bad indentation", BASE.replace("    steps: 4\n", "   steps: 4\n"), 9, "invalid YAML"),
    text("a key said twice", BASE.replace("    steps: 4\n", "    steps: 4\n    steps: 5\n"), 10, "appears twice"),
    text("a stage said twice", BASE + "  base:\n    kind: sft\n    steps: 1\n", 32, "appears twice"),
    text("a document separator", BASE + "---\nname: other\n", None, "invalid YAML"),
    # ----- top-level keys
    sub("no name", "name: corpus\n", "", None, "name"),
    sub("no stages", "stages:\n", "stagez:\n", None, "stages: Field required"),
    sub("unknown top-level key", "seed: 0\n", "seed: 0\nlearning_rate: 1\n", 3, "learning_rate"),
    sub("recipe name with a slash", "name: corpus", "name: ../corpus", 1, "name"),
    sub("recipe name empty", "name: corpus", "name: ''", 1, "name"),
    sub("seed a string", "seed: 0", "seed: zero", 2, "seed"),
    sub("seed a float", "seed: 0", "seed: 0.5", 2, "seed"),
    sub("seed a bool", "seed: 0", "seed: true", 2, "seed"),
    sub("domains a string", "domains: [addition, reversal]", "domains: addition", 3, "domains"),
    sub("unknown domain", "domains: [addition, reversal]", "domains: [addition, reversal, chess]", 3, "chess"),
    sub("domains empty", "domains: [addition, reversal]", "domains: []", 3, "domains"),
    sub("eval size zero", "eval: {size: 4,", "eval: {size: 0,", 4, "size"),
    sub("eval size negative", "eval: {size: 4,", "eval: {size: -4,", 4, "size"),
    sub("eval tokens a string", "max_new_tokens: 4}", "max_new_tokens: many}", 4, "max_new_tokens"),
    sub("eval unknown key", "max_new_tokens: 4}", "max_new_tokens: 4, greedy: yes}", 4, "greedy"),
    sub("recipe dtype unknown", "seed: 0\n", "seed: 0\ndtype: float8\n", 3, "dtype"),
    sub("recipe device unknown", "seed: 0\n", "seed: 0\ndevice: tpu\n", 3, "device"),
    sub("stages empty", BASE[BASE.index("stages:"):], "stages: {}\n", 5, "stages"),
    sub("stages a list", BASE[BASE.index("stages:"):], "stages: [base]\n", 5, "stages"),
    # ----- stage names
    sub("stage name is a path", "  teacher_rev:\n", "  ../../x:\n", 18, "../../x"),
    sub("stage name absolute", "  teacher_rev:\n", "  /tmp/x:\n", 18, "/tmp/x"),
    sub("stage name is a dot", "  teacher_rev:\n", "  .:\n", 18, "'.'"),
    sub("stage name with a space", "  teacher_rev:\n", "  teacher rev:\n", 18, "teacher rev"),
    sub("stage name empty", "  teacher_rev:\n", "  '':\n", 18, "''"),
    sub("stage name a number", "  teacher_rev:\n", "  7:\n", 18, "quote it ('7')"),
    # ----- stage kinds and keys
    sub("unknown kind", "kind: pretrain", "kind: pretraining", 7, "pretraining"),
    sub("no kind", "    kind: pretrain\n", "", 6, "kind"),
    sub("unknown stage key", "    batch_size: 4\n", "    batch_size: 4\n    batchsize: 4\n", 11, "batchsize"),
    sub("key of another kind", "    batch_size: 4\n", "    batch_size: 4\n    teachers: {}\n", 11, "teachers"),
    sub("stage is a list", BASE[BASE.index("  student:"):], "  student: [mopd]\n", 25, "student"),
    # ----- numbers
    sub("steps zero", "    steps: 4\n", "    steps: 0\n", 9, "steps"),
    sub("steps negative", "    steps: 4\n", "    steps: -4\n", 9, "steps"),
    sub("steps true", "    steps: 4\n", "    steps: true\n", 9, "steps"),
    sub("steps a string", "    steps: 4\n", "    steps: '4'\n", 9, "steps"),
    sub("steps a float", "    steps: 4\n", "    steps: 4.5\n", 9, "steps"),
    sub("steps null", "    steps: 4\n", "    steps:\n", 9, "steps"),
    sub("batch size zero", "    batch_size: 4\n", "    batch_size: 0\n", 10, "batch_size"),
    sub("lr infinite", "    batch_size: 4\n", "    batch_size: 4\n    lr: .inf\n", 11, "lr"),
    sub("lr nan", "    batch_size: 4\n", "    batch_size: 4\n    lr: .nan\n", 11, "lr"),
    sub("lr negative", "    batch_size: 4\n", "    batch_size: 4\n    lr: -0.001\n", 11, "lr"),
    sub("lr a word", "    batch_size: 4\n", "    batch_size: 4\n    lr: fast\n", 11, "lr"),
    sub("lr huge exponent", "    batch_size: 4\n", "    batch_size: 4\n    lr: 1e400\n", 11, "lr"),
    sub("checkpoint_every zero", "    batch_size: 4\n", "    batch_size: 4\n    checkpoint_every: 0\n", 11,
        "checkpoint_every"),
    sub("warmup negative", "    batch_size: 4\n", "    batch_size: 4\n    warmup_steps: -1\n", 11, "warmup_steps"),
    sub("grad_clip zero", "    batch_size: 4\n", "    batch_size: 4\n    grad_clip: 0\n", 11, "grad_clip"),
    sub("nonfinite unknown", "    batch_size: 4\n", "    batch_size: 4\n    nonfinite: ignore\n", 11, "nonfinite"),
    sub("schedule unknown", "    batch_size: 4\n", "    batch_size: 4\n    schedule: step\n", 11, "schedule"),
    sub("stage dtype unknown", "    batch_size: 4\n", "    batch_size: 4\n    dtype: int8\n", 11, "dtype"),
    sub("group size zero", "    group_size: 2\n", "    group_size: 0\n", 17, "group_size"),
    sub("temperature zero", "    group_size: 2\n", "    group_size: 2\n    temperature: 0\n", 18, "temperature"),
    sub("top_p above one", "    group_size: 2\n", "    group_size: 2\n    top_p: 1.5\n", 18, "top_p"),
    sub("eps_high below one", "    group_size: 2\n", "    group_size: 2\n    eps_high: 0.9\n", 18, "eps_high"),
    sub("linear temperature without end", "    group_size: 2\n",
        "    group_size: 2\n    temperature_schedule: linear\n", 18, "temperature_end"),
    # ----- the model shape
    sub("heads zero", BASE_MODEL, BASE_MODEL.replace("heads: 2,", "heads: 0,"), 8, "heads"),
    sub("hidden size a string", BASE_MODEL, BASE_MODEL.replace("hidden_size: 16", "hidden_size: big"), 8,
        "hidden_size"),
    sub("model too large for this machine", BASE_MODEL,
        BASE_MODEL.replace("hidden_size: 16", "hidden_size: 65536").replace("intermediate_size: 32",
                                                                            "intermediate_size: 1048576"), 8,
        "needs at least"),
    sub("head size odd", BASE_MODEL, BASE_MODEL.replace("hidden_size: 16", "hidden_size: 18"), 8, "even"),
    sub("hidden size not divisible by heads", BASE_MODEL, BASE_MODEL.replace("hidden_size: 16", "hidden_size: 15"),
        8, "divide"),
    sub("model unknown key", BASE_MODEL, BASE_MODEL.replace("layers: 1,", "layers: 1, experts: 8,"), 8, "experts"),
    # ----- references
    sub("init names no stage", "    init: base\n    domains: [addition]", "    init: bse\n    domains: [addition]",
        13, "bse"),
    sub("init itself", "    init: base\n    domains: [addition]", "    init: teacher_add\n    domains: [addition]",
        13, "itself"),
    sub("a cycle", "    init: base\n    domains: [addition]", "    init: student\n    domains: [addition]", None, "cycle"),
    sub("init a missing directory", "    init: base\n    domains: [addition]",
        "    init: ./no/such/model\n    domains: [addition]", 13, "no/such/model"),
    sub("teacher names no stage", TEACH, "    teachers: {addition: teacher_ad, reversal: teacher_rev}\n", 28,
        "teacher_ad"),
    sub("teacher domain not in recipe", TEACH,
        "    teachers: {addition: teacher_add, reversal: teacher_rev, chess: teacher_rev}\n", 28, "chess"),
    sub("a reward-only domain with a distribution objective", TEACH,
        "    teachers: {addition: teacher_add}\n    objective: topk\n", 29, "'reversal' has no teacher"),
    sub("teachers empty", TEACH, "    teachers: {}\n", 28, "teacher"),
    sub("teachers a list", TEACH, "    teachers: [teacher_add, teacher_rev]\n", 28, "teachers"),
    sub("stage domain unknown", "    domains: [addition]\n", "    domains: [additon]\n", 14, "additon"),
    sub("objective unknown", TEACH, TEACH + "    objective: kl\n", 29, "objective"),
    sub("alpha negative", TEACH, TEACH + "    alpha: -1\n", 29, "alpha"),
    sub("jsd beta one", TEACH, TEACH + "    jsd_beta: 1\n", 29, "jsd_beta"),
    sub("topk zero", TEACH, TEACH + "    topk: 0\n", 29, "topk"),
    sub("preflight unknown key", TEACH, TEACH + "    preflight: {kl: 1}\n", 29, "kl"),
    sub("teacher-gain gate not a number", TEACH, TEACH + "    preflight: {min_teacher_gain: lots}\n", 29,
        "min_teacher_gain"),
    sub("schedule without snapshots", TEACH, TEACH + "    teacher_schedule: [{until_step: 1, snapshot: 1}, "
        "{until_step: 2, snapshot: final}]\n", 29, "snapshot"),
    sub("lora rank zero", TEACH, TEACH + "    lora: {r: 0}\n", 29, "r"),
    sub("lora dropout one", TEACH, TEACH + "    lora: {dropout: 1}\n", 29, "dropout"),
    # ----- teacher backends (issue 16, item 2)
    sub("teacher backend names no teacher", TEACH, TEACH + "    teacher_backends: {teacher_ad: {backend: actor}}\n", 29,
        "'teacher_ad' is no teacher of this stage"),
    sub("teacher backend unknown", TEACH, TEACH + "    teacher_backends: {teacher_add: {backend: grpc}}\n", 29,
        "'grpc'"),
    sub("teacher url without scheme", TEACH, TEACH + "    teacher_backends: {teacher_add: {backend: http, url: "
        "'h:8000'}}\n", 29, "url"),
    sub("http teacher with a full-distribution objective", TEACH, TEACH + "    objective: jsd\n    teacher_backends: "
        "{teacher_add: {backend: http, url: 'http://h:8000/v1'}}\n", 30, "not the full distribution"),
    sub("report student not mopd", "stages:\n", "report: {student: base}\nstages:\n", 5, "base"),
    # ----- dpo and rejection_sampling (issue 20)
    sub("dpo policy pairs from one sample", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n"
        "    group_size: 1\n  student:\n", 29, "group_size >= 2"),
    sub("dpo beta zero", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n    beta: 0\n"
        "  student:\n", 29, "beta"),
    sub("dpo beta negative", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n    beta: -0.1\n"
        "  student:\n", 29, "beta"),
    sub("dpo reference unknown", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n"
        "    reference: bsae\n  student:\n", 29, "bsae"),
    sub("dpo reference an eval stage", "  student:\n", "  scores:\n    kind: eval\n    models: [base]\n"
        "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n    reference: scores\n  student:\n", 32,
        "eval stage"),
    sub("dpo delta pair weak unknown", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n"
        "    pairs_from: {strong: teacher_add, weak: nobody}\n  student:\n", 29, "nobody"),
    sub("dpo loss unknown", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n    loss: hinge\n"
        "  student:\n", 29, "loss"),
    sub("rejection threshold above one", "  student:\n", "  rs:\n    kind: rejection_sampling\n    init: base\n"
        "    steps: 1\n    threshold: 1.5\n  student:\n", 29, "threshold"),
    sub("rejection threshold negative", "  student:\n", "  rs:\n    kind: rejection_sampling\n    init: base\n"
        "    steps: 1\n    threshold: -0.5\n  student:\n", 29, "threshold"),
    sub("rejection n zero", "  student:\n", "  rs:\n    kind: rejection_sampling\n    init: base\n    steps: 1\n"
        "    n: 0\n  student:\n", 29, "n"),
    sub("rejection threshold of a domain not sampled", "  student:\n", "  rs:\n    kind: rejection_sampling\n"
        "    init: base\n    domains: [addition]\n    steps: 1\n    domain_thresholds: {reversal: 0.5}\n  student:\n",
        30, "'reversal' is not one of the stage's domains"),
    sub("rejection domain threshold above one", "  student:\n", "  rs:\n    kind: rejection_sampling\n"
        "    init: base\n    domains: [addition]\n    steps: 1\n    domain_thresholds: {addition: 1.5}\n  student:\n",
        30, "less than or equal to 1"),
    sub("rejection sampler an eval stage", "  student:\n", "  scores:\n    kind: eval\n    models: [base]\n"
        "  rs:\n    kind: rejection_sampling\n    init: base\n    steps: 1\n    sampler: scores\n  student:\n",
        32, "eval stage"),
    # ----- reward models, judges, ppo and reward sources (issue 20)
    text("ppo without a reward on a judged domain", STYLE.replace("  student:\n", "  tune:\n    kind: ppo\n"
         "    init: base\n    domains: [style]\n    steps: 1\n  student:\n"), 25, "'style' has no rule-based reward"),
    text("dpo without pairs on a judged domain", STYLE.replace("  student:\n", "  pref:\n    kind: dpo\n"
         "    init: base\n    domains: [style]\n    steps: 1\n  student:\n"), 25, "'style' has no rule-based reward"),
    sub("judge is a reward model", "  student:\n", "  rm:\n    kind: reward_model\n    init: base\n    steps: 1\n"
        "  tune:\n    kind: rlvr\n    init: base\n    steps: 1\n    reward: {judge: rm, rubric: neat}\n"
        "  student:\n", 33, "'rm' is a reward model (a sequence classifier), not a causal LM"),
    sub("reward model is a causal LM", "  student:\n", "  tune:\n    kind: ppo\n    init: base\n    steps: 1\n"
        "    reward: {reward_model: teacher_add}\n  student:\n", 29, "is not a reward model"),
    sub("judge without a rubric", "  student:\n", "  tune:\n    kind: rlvr\n    init: base\n    steps: 1\n"
        "    reward: {judge: base}\n  student:\n", 29, "a judge needs a `rubric`"),
    sub("judge rubric outside the alphabet", "  student:\n", "  tune:\n    kind: rlvr\n    init: base\n"
        "    steps: 1\n    reward: {judge: base, rubric: Be neat.}\n  student:\n", 29, "characters '.B' are not in"),
    sub("reward source unknown", "  student:\n", "  tune:\n    kind: rlvr\n    init: base\n    steps: 1\n"
        "    reward: rules\n  student:\n", 29, "unknown reward source 'rules'"),
    sub("pairs dataset missing", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n    steps: 1\n"
        "    pairs_from: {dataset: no_pairs.jsonl}\n  student:\n", 29, "no such preference dataset"),
    sub("reward model from one sample", "  student:\n", "  rm:\n    kind: reward_model\n    init: base\n"
        "    steps: 1\n    group_size: 1\n  student:\n", 29, "group_size >= 2"),
    sub("ppo clip one", "  student:\n", "  tune:\n    kind: ppo\n    init: base\n    steps: 1\n    clip: 1\n"
        "  student:\n", 29, "clip"),
    sub("ppo epochs not dividing checkpoints", "  student:\n", "  tune:\n    kind: ppo\n    init: base\n"
        "    steps: 4\n    epochs: 3\n  student:\n", 25, "multiple of `epochs`"),
    sub("a reward model as an init", "  student:\n", "  rm:\n    kind: reward_model\n    init: base\n    steps: 1\n"
        "  tune:\n    kind: sft\n    init: rm\n    steps: 1\n  student:\n", 31, "'rm' is a reward model: it scores"),
    sub("ppo critic unknown", "  student:\n", "  tune:\n    kind: ppo\n    init: base\n    steps: 1\n"
        "    critic: critc\n  student:\n", 29, "critc"),
    text("per-domain reward leaves a judged domain to rules", STYLE.replace("  student:\n", "  tune:\n    kind: rlvr\n"
         "    init: base\n    domains: [addition, style]\n    steps: 1\n"
         "    reward: {per_domain: {addition: verifier}}\n  student:\n"), 30, "'style' has no rule-based reward"),
    sub("per-domain reward for a domain not trained", "  student:\n", "  tune:\n    kind: rlvr\n    init: base\n"
        "    domains: [addition]\n    steps: 1\n    reward: {per_domain: {reversal: {judge: base, rubric: neat}}}\n"
        "  student:\n", 30, "this stage rewards no rows of domain 'reversal'"),
    text("per-domain judge is a reward model", STYLE.replace("  student:\n", "  rm:\n    kind: reward_model\n"
         "    init: base\n    domains: [addition]\n    steps: 1\n  tune:\n    kind: rlvr\n    init: base\n"
         "    domains: [addition, style]\n    steps: 1\n    reward: {per_domain: {style: {judge: rm, rubric: neat}}}\n"
         "  student:\n"), 35, "reward.per_domain.style.judge: 'rm' is a reward model"),
    sub("per-domain reward empty", "  student:\n", "  tune:\n    kind: rlvr\n    init: base\n    steps: 1\n"
        "    reward: {per_domain: {}}\n  student:\n", 29, "per_domain maps domains to reward sources"),
    Case("per-domain judge on the judged domain", None, STYLE.replace("  student:\n", "  tune:\n    kind: rlvr\n"
         "    init: base\n    domains: [addition, style]\n    steps: 1\n"
         "    reward: {per_domain: {style: {judge: base, rubric: neat}}}\n  student:\n").replace(
             TEACH, TEACH + "    domains: [addition, reversal]\n"), None, "", legal=True),
    # ----- rollout workers and the data-parallel learner (issue 16)
    sub("rollout workers zero", "    group_size: 2\n", "    group_size: 2\n    rollout: {workers: 0}\n", 18, "workers"),
    sub("rollout max_lag negative", "    group_size: 2\n", "    group_size: 2\n    rollout: {max_lag: -1}\n", 18,
        "max_lag"),
    sub("rollout groups_per_call zero", "    group_size: 2\n", "    group_size: 2\n    rollout: {groups_per_call: 0}\n",
        18, "groups_per_call"),
    sub("learner workers zero", "    group_size: 2\n", "    group_size: 2\n    learner: {workers: 0}\n", 18, "workers"),
    sub("learner strategy unknown", "    group_size: 2\n", "    group_size: 2\n    learner: {strategy: zero3}\n", 18,
        "strategy"),
    # ----- plugins
    sub("plugin missing", "seed: 0\n", "seed: 0\nplugins: [./no_such_plugin.py]\n", 3, "no_such_plugin"),
    sub("plugins a string", "seed: 0\n", "seed: 0\nplugins: 7\n", 3, "plugins"),
    # ----- inputs nobody tried (issue 36): each one line at load, before compute
    text("an alias bomb (9 levels of 10 aliases)", ALIAS_BOMB + BASE, 5, "alias *a3 expands the recipe past 100,000"),
    sub("nesting 1000 levels deep", "seed: 0\n", "seed: 0\nx: " + "[" * 1000 + "]" * 1000 + "\n", 3,
        "nested more than 64 levels deep"),
    sub("nested mappings 1000 levels deep", "seed: 0\n", "seed: 0\nx: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n", 3,
        "nested more than 64 levels deep"),
    sub("a stage named run.json", "  teacher_rev:\n", "  run.json:\n", 18, "keeps its own 'run.json'"),
    sub("a stage named summary.json", "  teacher_rev:\n", "  summary.json:\n", 18, "keeps its own 'summary.json'"),
    sub("a stage named recipe.yaml", "  teacher_rev:\n", "  recipe.yaml:\n", 18, "keeps its own 'recipe.yaml'"),
    sub("a stage named Report.MD (a case-insensitive filesystem)", "  teacher_rev:\n", "  Report.MD:\n", 18,
        "keeps its own 'report.md'"),
    sub("a stage name of 300 characters", "  teacher_rev:\n", "  " + "t" * 300 + ":\n", 18, "is 300 characters"),
    sub("a recipe name of 300 characters", "name: corpus", "name: " + "c" * 300, 1, "the recipe name is 300"),
    sub("seed 2**64", "seed: 0", f"seed: {2**64}", 2, "seed: Input should be less than or equal to"),
    sub("seed negative", "seed: 0", "seed: -1", 2, "seed"),
    sub("seeds running past 2**64", "seed: 0\n", f"seed: {2**64 - 2}\nseeds: 3\n", 2, "go past"),
    sub("a stage seed 2**64", "    batch_size: 4\n", f"    batch_size: 4\n    seed: {2**64}\n", 11, "seed"),
    sub("max_new_tokens a billion", "    group_size: 2\n", "    group_size: 2\n    max_new_tokens: 1000000000\n", 18,
        "max_new_tokens: Input should be less than or equal to 1048576"),
    sub("rollouts whose sampler buffers cannot fit", "    group_size: 2\n", "    group_size: 4096\n"
        "    max_new_tokens: 1048576\n", 18, "the sampler's buffers alone are"),
    sub("group size a million", "    group_size: 2\n", "    group_size: 1000000\n", 17, "group_size"),
    sub("sft batch size a billion", "  student:\n", "  tune:\n    kind: sft\n    init: base\n    steps: 1\n"
        "    batch_size: 1000000000\n  student:\n", 29, "batch_size: Input should be less than or equal to 65536"),
    sub("steps 2**64", "    steps: 4\n", f"    steps: {2**64}\n", 9, "steps: Input should be less than or equal to"),
    sub("steps 1e12", "    steps: 4\n", "    steps: 1000000000000\n", 9, "steps"),
    sub("lr 1e38 without clipping", "    batch_size: 4\n", "    batch_size: 4\n    lr: 1.0e+38\n    grad_clip: null\n",
        11, "lr: Input should be less than or equal to 1"),
    sub("eval max_new_tokens a billion", "max_new_tokens: 4}", "max_new_tokens: 1000000000}", 4, "max_new_tokens"),
    # ----- legal, if unusual: these load
    legal("names with dots and dashes", "  student:\n", "  extra-sft.v2:\n    kind: sft\n    init: base\n    steps: 1\n"
          "  student:\n"),
    legal("a reward-only domain (no teacher: GRPO in the stage)", TEACH, "    teachers: {addition: teacher_add}\n"),
    legal("unicode in a comment", "seed: 0\n", "seed: 0  # graine ☃\n"),
    legal("a flow-style stage", "    kind: pretrain\n", "    kind: 'pretrain'\n"),
    legal("the largest seed", "seed: 0", f"seed: {2**64 - 1}"),
    legal("anchors and aliases within bounds", "    kind: pretrain\n", "    kind: &k pretrain\n"),
    legal("scientific notation lr", "    batch_size: 4\n", "    batch_size: 4\n    lr: 3.0e-4\n"),
    legal("dpo and rejection sampling with defaults", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n"
          "    steps: 1\n  rs:\n    kind: rejection_sampling\n    init: pref\n    sampler: teacher_add\n    steps: 1\n"
          "  student:\n"),
    legal("dpo on delta pairs with group_size 1", "  student:\n", "  pref:\n    kind: dpo\n    init: base\n"
          "    steps: 1\n    pairs_from: {strong: teacher_add, weak: base}\n    group_size: 1\n  student:\n"),
]
