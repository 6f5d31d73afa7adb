"""`mopd init --agent`: a starter for tool-use agents, a plugin tool domain and a recipe that distils it.

Why a template of its own: a tool domain has more parts than a single-turn one (tools, a demonstration, a state
made per episode), and a user copies a file that runs before reading the API (docs/AGENTS.md, "Writing a tool
domain"). The plugin's `shop` domain uses each part a small model can learn: a per-problem price table made by
`setup` (the same item costs something else in another shop, so no model can memorise prices), two `price`
calls in one turn (run concurrently), then an `add` call, then the answer. The recipe is the bundled `agents`
recipe's shape at a smaller scale: a start that has seen a few gold trajectories, a shop teacher (SFT on gold
trajectories, then GRPO on its own episodes) and a reversal teacher, and a MOPD student from the start.
"""

from __future__ import annotations

from pathlib import Path

from .bundled import SCHEMA_COMMENT, SCHEMA_FILE, schema_text

TOOLS_FILE = "my_tools.py"
AGENT_DOMAIN = "shop"

TOOLS_TEMPLATE = f'''"""A tool-use domain for mopd: list this file under `plugins:` in the recipe, the name under `domains:`.

    prompt  shop:ab+cd=            the total price of items ab and cd in this shop
    turns   price:ab price:cd      two calls in one turn (they run at the same time); observation `37 52=`
            add:37,52              observation `89=`
            89                     the final answer, rewarded by the verifier (partial_match_reward)

Each episode gets its shop's price table from `setup(problem)`: a price is a hash of the shop (the prompt) and
the item, so the same item costs something else in another problem and no model can compute or memorise it.
Tools that declare a `ToolContext` parameter receive the problem and that state; the model never writes it.
Prompts, calls and answers use only `mopd.envs.ALPHABET` (the recipe trains its own character model).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from mopd.envs import Limits, Problem, ToolContext, register_tool_domain

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class Shop:
    """One episode's state: the shop's prices, and the items the agent looked up."""

    prompt: str
    looked_up: list[str] = field(default_factory=list)

    def price(self, item: str) -> int:
        digest = hashlib.sha256(f"{{self.prompt}}/{{item}}".encode()).digest()
        return 10 + int.from_bytes(digest[:4], "little") % 90


def open_shop(problem: Problem) -> Shop:
    """setup: made when an episode starts (teardown, if you need one, gets it when the episode ends)."""
    return Shop(problem.prompt)


def items(problem: Problem) -> list[str]:
    return problem.prompt[len("shop:") : -1].split("+")


def price(ctx: ToolContext, item: str) -> int | str:
    """The price of an item in this shop."""
    if item not in items(ctx.problem):
        return "none"
    ctx.state.looked_up.append(item)
    return ctx.state.price(item)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def demonstration(problem: Problem) -> list[str]:
    """The turns a perfect agent writes: what SFT trains on (played through the tools for the observations)."""
    shop, (x, y) = Shop(problem.prompt), items(problem)
    return [f"price:{{x}} price:{{y}}", f"add:{{shop.price(x)}},{{shop.price(y)}}", str(shop.price(x) + shop.price(y))]


@register_tool_domain("{AGENT_DOMAIN}", tools=[price, add], demonstration=demonstration, setup=open_shop,
                      difficulties=(1, 2), limits=Limits(max_turns=4, max_tokens=56),
                      description="shop:ab+cd= -> the total price of two items in this shop: price both, add")
def shop(rng: random.Random, difficulty: int) -> tuple[str, str]:
    x, y = ("".join(rng.choice(LETTERS) for _ in range(difficulty + 1)) for _ in range(2))
    prompt = f"shop:{{x}}+{{y}}="
    prices = Shop(prompt)
    return prompt, str(prices.price(x) + prices.price(y))
'''


def agent_recipe_text(name: str) -> str:
    """The agent starter recipe: the bundled `agents` recipe's shape, smaller."""
    return "\n".join([
        SCHEMA_COMMENT,
        f"# {name}: a tool-use agent starter written by `mopd init --agent`; it runs as written (about 6 minutes",
        "# on one laptop CPU core).",
        "#",
        "#   mopd validate recipe.yaml   # every load-time check, nothing trained",
        f"#   mopd run recipe.yaml        # trains into runs/{name}/: checkpoints, report.md (with agent figures)",
        "#",
        "#   base (pretrain) -> sft -> start (a few gold trajectories of every domain)",
        "#     start -> sft_shop (gold trajectories) -> teacher_shop (GRPO on its own episodes)",
        "#     start -> sft_rev -> teacher_rev (GRPO)",
        "#     start -> student (MOPD: plays its own episodes, each scored by its domain's teacher)",
        "#",
        f"# {TOOLS_FILE} registers the `{AGENT_DOMAIN}` tool domain (two tools, a state per episode, parallel calls):",
        "# edit it, or add your own beside it; docs/AGENTS.md explains each part.",
        f"name: {name}",
        "seed: 0",
        f"domains: [{AGENT_DOMAIN}, reversal]",
        f"plugins: [{TOOLS_FILE}]",
        "eval: {size: 64, max_new_tokens: 10}   # a tool domain's eval plays greedy episodes",
        "stages:",
        "  base:",
        "    kind: pretrain",
        "    domains: [reversal]",
        "    model: {hidden_size: 128, layers: 2, heads: 4, kv_heads: 2, intermediate_size: 384}",
        "    steps: 300",
        "    batch_size: 64",
        "    lr: 3.0e-3",
        "    warmup_steps: 20",
        "    schedule: cosine",
        "  sft: {kind: sft, init: base, domains: [reversal], steps: 50, batch_size: 64, lr: 1.0e-3}",
        "  # the start: has seen the call format, cannot use the tools yet",
        "  start: {kind: sft, init: sft, steps: 60, batch_size: 64, lr: 1.0e-3}",
        f"  sft_shop: {{kind: sft, init: start, domains: [{AGENT_DOMAIN}], steps: 500, batch_size: 64, lr: 3.0e-3, "
        "warmup_steps: 20, schedule: cosine}",
        f"  teacher_shop: {{kind: rlvr, init: sft_shop, domains: [{AGENT_DOMAIN}], steps: 30, batch_size: 16, "
        "group_size: 8, lr: 1.0e-4, warmup_steps: 5}",
        "  sft_rev: {kind: sft, init: start, domains: [reversal], steps: 150, batch_size: 64, lr: 1.0e-3}",
        "  teacher_rev: {kind: rlvr, init: sft_rev, domains: [reversal], steps: 30, batch_size: 16, group_size: 8, "
        "lr: 1.0e-4, warmup_steps: 5}",
        "  student:",
        "    kind: mopd",
        "    init: start",
        f"    teachers: {{{AGENT_DOMAIN}: teacher_shop, reversal: teacher_rev}}",
        "    objective: forward_kl          # the teacher's full next-token distribution at each model token",
        "    temperature: 0.5",
        "    steps: 400",
        "    batch_size: 64",
        "    lr: 3.0e-3",
        "    warmup_steps: 20",
        "    schedule: cosine",
        "    eval_every: 200",
        "    preflight: {kl_warn: 10.0}     # a start that cannot use the tools sits far from the tool teacher",
    ]) + "\n"


def agent_files(directory: Path, name: str) -> dict[Path, str]:
    """What `mopd init --agent` writes: the recipe, the tool-domain plugin and the schema."""
    return {directory / "recipe.yaml": agent_recipe_text(name), directory / TOOLS_FILE: TOOLS_TEMPLATE,
            directory / SCHEMA_FILE: schema_text()}
