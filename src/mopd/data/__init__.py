"""Prompt sources for real verifiable domains: JSONL / JSON / parquet / ``datasets``, plus small bundled sets."""

from .prompts import BUNDLED, PromptRecord, bundled_path, load_prompts

__all__ = ["BUNDLED", "PromptRecord", "bundled_path", "load_prompts"]
