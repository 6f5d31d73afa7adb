"""Optional packages (the extras: `mopd[ray]`, `mopd[serve]`, ...): whether one can be used here, in one line."""

from __future__ import annotations

import importlib


def import_problem(module: str) -> str | None:
    """Why `import module` fails here, in one line; None when it imports.

    An import, not `importlib.util.find_spec`: a package that is found but cannot be imported (a broken install, a
    dependency of its own that is missing, an import hook that refuses it) fails only when it is imported, which
    is what a stage would do hours later. The price is the import itself, asked only where the package is needed.
    """
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or whatever a broken package raises while it initialises
        lines = str(e).strip().splitlines()
        return f"import {module}: {type(e).__name__}" + (f": {lines[0]}" if lines else "")
    return None
