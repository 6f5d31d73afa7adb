"""Teachers hosted by Ray actors: one actor per teacher checkpoint, each on its own worker and device.

Why: a panel of large teachers does not fit beside the student, and each teacher's forward pass is independent
of the others'. An actor loads its checkpoint once (with the resources its `teacher_backends` entry reserves:
`gpus > 0` scores on its GPU) and keeps it for the stage; `MixedPanel` starts every actor on its routed rows,
then waits, so the teachers score at the same time. Inside the actor the scoring is `TeacherPanel`'s, op for op,
so an actor-hosted teacher gives the in-process numbers (to float rounding of the thread count).

Faults: a dead actor (its worker killed, its node lost) is restarted by Ray (`max_restarts`), which reloads the
checkpoint, and the call it was serving is retried (`max_task_retries`): scoring is a pure function of the
batch, so the step gets the numbers it would have had. Only what goes over the wire is sent: token ids, the
attention and completion masks; results come back on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from ..core.batch import RolloutBatch
from ..core.errors import StageError
from ..core.schema import ActorBackend
from ..runtime import start_local_ray
from .panel import TeacherPanel
from .preflight import PreflightError
from .remote import Pending


def scoring_batch(ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, completion_B_T: torch.Tensor) -> RolloutBatch:
    """The part of a batch a teacher reads (ids, attention and completion masks), rebuilt on the other side."""
    B = ids_B_T.shape[0]
    return RolloutBatch(input_ids_B_T=ids_B_T, attention_mask_B_T=mask_B_T, completion_mask_B_T=completion_B_T,
                        sampler_logprobs_B_T=torch.zeros_like(completion_B_T), domains=[""] * B,
                        group_ids_B=torch.arange(B))


class TeacherWorker:
    """The body of one teacher actor (`ray.remote` is applied when the actor is made, so this module imports
    without Ray). Its panel holds one model under the name "t"; `seconds` adds up time spent scoring."""

    def __init__(self, checkpoint: str, dtype: torch.dtype | None, logit_chunk: int | None, threads: int,
                 on_gpu: bool, share_prefill: bool = False):
        from ..models.checkpoint import load_model

        torch.set_num_threads(max(1, threads))
        device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
        model = load_model(checkpoint, dtype=dtype or torch.float32).eval().requires_grad_(False).to(device)
        self.device = device
        self.panel = TeacherPanel(models={"t": model}, teacher_of_domain={}, logit_chunk=logit_chunk,
                                  share_prefill=share_prefill)
        self.seconds = 0.0

    def ready(self) -> str:
        return str(self.device)

    def _run(self, fn, ids, mask, completion, *args):
        start = time.perf_counter()
        batch = scoring_batch(ids, mask, completion).to(self.device)
        out = fn(batch, ["t"] * batch.size, *args)
        out = tuple(x.cpu() for x in out) if isinstance(out, tuple) else out.cpu()
        self.seconds += time.perf_counter() - start
        return out

    def sampled(self, ids, mask, completion) -> torch.Tensor:
        return self._run(self.panel.sampled_logprobs, ids, mask, completion)

    def topk(self, ids, mask, completion, k: int, window: int):
        return self._run(self.panel.topk, ids, mask, completion, k, window)

    def logits(self, ids, mask, completion, keep: int) -> torch.Tensor:
        return self._run(lambda b, n, kp: self.panel.logit_blocks(b, n, kp)(0, kp), ids, mask, completion, keep)

    def scoring_seconds(self) -> float:
        """Seconds spent scoring since the last call (for benchmarks: the rest of a call's time is transfer)."""
        s, self.seconds = self.seconds, 0.0
        return s


class ActorTeacher:
    """`remote.RemoteTeacher` over one actor handle (teachers that share a checkpoint share the handle)."""

    def __init__(self, stage: str, name: str, handle):
        self.stage, self.name, self.handle = stage, name, handle

    def _call(self, method: str, batch: RolloutBatch, *args) -> Pending:
        import ray

        ref = getattr(self.handle, method).remote(batch.input_ids_B_T, batch.attention_mask_B_T,
                                                  batch.completion_mask_B_T, *args)

        def wait():
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise StageError(f"stage {self.stage!r}: teacher {self.name!r}: its actor died and could not be "
                                 f"restarted (max_restarts reached; {e.__class__.__name__})") from None
        return wait

    def sampled(self, batch: RolloutBatch) -> Pending:
        return self._call("sampled", batch)

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        return self._call("topk", batch, k, window)

    def logits(self, batch: RolloutBatch, keep: int) -> Pending:
        return self._call("logits", batch, keep)


def start_actors(
    stage: str, checkpoints: Mapping[str, str], backends: Mapping[str, ActorBackend], dtype: torch.dtype | None,
    logit_chunk: int | None, share_prefill: bool = False,
) -> dict[str, ActorTeacher]:
    """One actor per distinct checkpoint of the teachers in `backends` (teacher name -> checkpoint in
    `checkpoints`), waited for until each has loaded its teacher. Every problem is one `PreflightError` line:
    Ray missing, more GPUs asked for than the cluster has, an actor that cannot start or load in time."""
    try:
        import ray
    except ImportError:
        first = sorted(backends)[0]
        raise PreflightError(f"stage {stage!r}: teacher {first!r} has `backend: actor`, which needs Ray: "
                             "pip install 'mopd[ray]'") from None
    if not ray.is_initialized():
        start_local_ray(ray, log_to_driver=False)
    by_checkpoint: dict[str, list[str]] = {}
    for name in sorted(backends):
        by_checkpoint.setdefault(checkpoints[name], []).append(name)
    cluster = ray.cluster_resources()
    handles, made = {}, []
    for ckpt, names in by_checkpoint.items():
        cpus = max(backends[n].resources.cpus for n in names)
        gpus = max(backends[n].resources.gpus for n in names)
        b = backends[names[0]]
        if gpus > cluster.get("GPU", 0) or cpus > cluster.get("CPU", 0):
            raise PreflightError(
                f"stage {stage!r}: teacher {names[0]!r} asks for {cpus:g} CPUs and {gpus:g} GPUs; the Ray cluster "
                f"has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs")
        actor = ray.remote(TeacherWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=b.max_restarts, max_task_retries=b.max_restarts,
        ).remote(ckpt, dtype, logit_chunk, int(cpus), gpus > 0, share_prefill)
        made.append((names, actor, b.ready_timeout))
        for n in names:
            handles[n] = actor
    for names, actor, timeout in made:
        try:
            ray.get(actor.ready.remote(), timeout=timeout)
        except Exception as e:
            for _, a, _ in made:
                ray.kill(a)
            why = f"not placed or loaded within {timeout:g}s (ready_timeout)" if isinstance(
                e, ray.exceptions.GetTimeoutError) else f"failed to load ({e.__class__.__name__}: {str(e)[-200:]})"
            raise PreflightError(f"stage {stage!r}: teacher {names[0]!r}'s actor was {why}".replace("\n", " ")) \
                from None
    return {n: ActorTeacher(stage, n, h) for n, h in handles.items()}
