"""Verifiable rewards for real domains: math answers, Python code, instruction-following constraints.

Each reward maps a completion (and the record's reference data) to a float in [0, 1]:

* ``math_reward(completion, reference)`` -> 1.0/0.0, via ``math-verify`` (imported on first use);
* ``code_reward(completion, tests)`` -> 1.0/0.0 for a test string, fraction passed for a list of tests,
  run in a sandboxed subprocess (see ``mopd.verifiers.sandbox`` for what is and is not isolated);
* ``instruction_reward(completion, constraints)`` -> fraction of declared constraints satisfied.
"""

from .code import code_reward, extract_code
from .instructions import CONSTRAINT_TYPES, check_constraint, instruction_reward, validate_constraints
from .math import extract_boxed, math_reward
from .sandbox import CodeRunResult, run_code_tests, sandbox_info

__all__ = [
    "CONSTRAINT_TYPES",
    "CodeRunResult",
    "check_constraint",
    "code_reward",
    "extract_boxed",
    "extract_code",
    "instruction_reward",
    "math_reward",
    "run_code_tests",
    "sandbox_info",
    "validate_constraints",
]
