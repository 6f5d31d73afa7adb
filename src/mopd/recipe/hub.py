"""Whether a Hugging Face Hub id a recipe names can be loaded on this machine, asked once at load.

Why: `from_pretrained` on an id that is neither cached nor reachable retries for about a minute and then raises a
traceback, and it does so when the stage that needs it starts, possibly after hours of earlier stages. Asking
the local cache (and, when it lacks the model and the Hub is allowed, the Hub itself with a short timeout) at
load turns that into one line before any compute.
"""

from __future__ import annotations

import os

HUB_TIMEOUT_S = 10.0


def hub_unavailable_reason(repo_id: str) -> str | None:
    """None when `repo_id`'s config is in the local cache or the Hub answers for it; else why not, in words."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "a gated model: accept its terms on the Hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "no such model on the Hub (or a private one: log in with `hf auth login`)"
    except Exception as e:  # no network, DNS, proxy, timeout: all mean the same here
        return f"not in the local Hugging Face cache, and the Hub cannot be reached ({e.__class__.__name__})"
    return None
