"""Synthetic verifiable domains: importing this package registers the built-in ones."""

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
    list_domains,
    load_plugin,
    partial_match_reward,
    register_domain,
)

__all__ = [
    "ALPHABET",
    "Domain",
    "DomainError",
    "DomainLike",
    "Problem",
    "domain_problem",
    "exact_match",
    "get_domain",
    "list_domains",
    "load_plugin",
    "partial_match_reward",
    "register_domain",
]
