"""Domains and environments: importing this package registers the built-in ones.

What a plugin file needs is exported here (docs/AGENTS.md): `register_domain` for a single-turn domain,
`register_tool_domain` with `tool`, `ToolContext`, `ToolReply` and `Limits` for a tool-use domain,
`register_verifiers_domain` for an environment written with `verifiers`, `python_tool` for the code sandbox as a
tool, and `guarded_verifier` for a domain object built by hand.
"""

from mopd.envs import synthetic as _synthetic  # noqa: F401  (registers the built-in domains)
from mopd.envs import text_domains as _text_domains  # noqa: F401  (registers caps, word_math, json_record)
from mopd.envs import tool_domains as _tool_domains  # noqa: F401  (registers the built-in tool-use domains)
from mopd.envs.base import (
    ALPHABET,
    Domain,
    DomainError,
    DomainLike,
    Problem,
    domain_problem,
    exact_match,
    get_domain,
    guarded_verifier,
    list_domains,
    load_plugin,
    partial_match_reward,
    register_domain,
)
from mopd.envs.episode import Limits, Reply, ToolEpisode
from mopd.envs.sandbox_tool import python_tool
from mopd.envs.tool_domains import ToolDomain, register_tool_domain
from mopd.envs.tools import Tool, ToolContext, ToolReply, tool
from mopd.envs.verifiers_env import register_verifiers_domain

__all__ = [
    "ALPHABET",
    "Domain",
    "DomainError",
    "DomainLike",
    "Limits",
    "Problem",
    "Reply",
    "Tool",
    "ToolContext",
    "ToolDomain",
    "ToolEpisode",
    "ToolReply",
    "domain_problem",
    "exact_match",
    "get_domain",
    "guarded_verifier",
    "list_domains",
    "load_plugin",
    "partial_match_reward",
    "python_tool",
    "register_domain",
    "register_tool_domain",
    "register_verifiers_domain",
    "tool",
]
