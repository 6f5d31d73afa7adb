"""Rollout workers and the data-parallel learner (issue 16, items 3-4): the same numbers, the measured per-step
costs, and a model of step time and memory on a GPU node that is a projection, not a measurement.

    .venv/bin/python benchmarks/scale_model.py [--part same|costs|project|all] [--seeds 3]

1. same: the miniature recipe (`MINI`: a base, two teacher stages at the same time, a MOPD student with 2 rollout
   workers) by the local executor over `--seeds` seeds; by `--executor ray` with 1 learner worker (its evals must
   be identical to the local seed-0 run's); with 2 learner workers on gloo (its final scores must lie within the
   local runs' spread over seeds); and with 2 FSDP learner workers (`strategy: fsdp`), the same way.
2. costs: on this machine, one MOPD step of the benchmarks' models (`_common`: 0.79M-parameter student, three
   2.77M-parameter teachers) split into sampling (whole batch; group by group; 8 groups per batched call, as
   rollout workers sample by default),
   teacher scoring, the update (loss + backward + AdamW, less the scoring inside it), the weight sync (the
   student's weights into Ray's object store and loaded by an actor) and a 2-rank gloo all-reduce of the
   gradient. Medians of `--repeats`.
3. project: step time against rollout workers R, learner workers L, teachers K and model size, and the largest
   student and teacher panel that fit a node of 8 x 80 GB, from stated GPU assumptions (ASSUME). Nothing of part
   3 ran on a GPU: no GPU was lent while this was written.
Writes benchmarks/results.json key "scale_model".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trl_vs_mopd import RESULTS, update_results

MINI = """\
name: mini_scale
seed: SEED
domains: [addition, reversal]
eval: {size: 40, max_new_tokens: 8}
stages:
  base:
    kind: pretrain
    model: {hidden_size: 48, layers: 2, heads: 2, kv_heads: 1, intermediate_size: 96}
    steps: 150
    batch_size: 32
  teacher_add:
    kind: rlvr
    init: base
    domains: [addition]
    steps: 10
    batch_size: 8
    group_size: 4
  teacher_rev:
    kind: rlvr
    init: base
    domains: [reversal]
    steps: 10
    batch_size: 8
    group_size: 4
  student:
    kind: mopd
    init: base
    teachers: {addition: teacher_add, reversal: teacher_rev}
    steps: 12
    batch_size: 8
    group_size: 2
    alpha: 0.5
    rollout: {workers: 2, cpus: 0.5, groups_per_call: 4}
    resources: {cpus: 0.5}
"""

# GPU figures the projection assumes (H100 SXM 80 GB class); none was measured here.
ASSUME = {
    "gpu_memory_gb": 80, "usable_fraction": 0.85, "bf16_tflops": 989.0, "mfu": 0.4, "hbm_tb_s": 3.35,
    "nvlink_gb_s": 300.0, "host_copy_gb_s": 25.0,
    "train_bytes_per_param": 18,  # bf16 weights 2 + fp32 master 4 + fp32 grads 4 + AdamW moments 8 (DDP: all)
    "serve_bytes_per_param": 2,  # bf16 weights of a teacher or a vLLM rollout engine
    "kv_fraction": 0.25,  # of a serving GPU's usable memory left to the KV cache
    "layer_fraction": 0.9,  # of a student's parameters in its decoder layers (Qwen3-8B 0.84, 32B 0.95)
    "copy_bytes_per_param": 4,  # FSDP: rank 0's unsharded copy of the float32 weights it samples and saves with
}


def _final_scores(run: Path) -> dict[str, float]:
    lines = (run / "student" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {k.removeprefix("eval/"): v for k, v in last.items() if k.startswith("eval/")}


def same(seeds: int) -> dict:
    from mopd.execution.runner import run_recipe
    from mopd.recipe.load import load_recipe

    root = Path(tempfile.mkdtemp(prefix="scale_same_"))
    torch.set_num_threads(1)
    out: dict = {"local": {}, "seconds": {}}
    for seed in range(seeds):
        (root / f"s{seed}.yaml").write_text(MINI.replace("SEED", str(seed)))
        t0 = time.perf_counter()
        run_recipe(load_recipe(root / f"s{seed}.yaml"), root / f"local{seed}")
        out["seconds"][f"local seed {seed}"] = round(time.perf_counter() - t0, 1)
        out["local"][seed] = _final_scores(root / f"local{seed}")
    (root / "dp.yaml").write_text(MINI.replace("SEED", "0") + "    learner: {workers: 2}\n")
    (root / "fsdp.yaml").write_text(MINI.replace("SEED", "0") + "    learner: {workers: 2, strategy: fsdp}\n")
    for name, recipe in (("ray, 1 learner worker", "s0.yaml"), ("ray, 2 learner workers", "dp.yaml"),
                         ("ray, 2 learner workers (fsdp)", "fsdp.yaml")):
        t0 = time.perf_counter()
        run_recipe(load_recipe(root / recipe), root / name.replace(" ", "_"), executor="ray", threads=1)
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        out[name] = _final_scores(root / name.replace(" ", "_"))
    local_curve = [json.loads(x) for x in (root / "local0" / "student" / "metrics.jsonl").read_text().splitlines()]
    ray_curve = [json.loads(x) for x in (root / "ray,_1_learner_worker" / "student" / "metrics.jsonl")
                 .read_text().splitlines()]
    drop = ("time",)
    out["ray 1 learner worker == local (every student record but time)"] = [
        {k: v for k, v in a.items() if k not in drop} for a in local_curve] == [
        {k: v for k, v in b.items() if k not in drop} for b in ray_curve]
    spread = {d: (min(s[d] for s in out["local"].values()), max(s[d] for s in out["local"].values()))
              for d in out["local"][0]}
    out["local spread over seeds"] = spread
    for name in ("ray, 2 learner workers", "ray, 2 learner workers (fsdp)"):
        out[f"{name} within the spread"] = all(spread[d][0] <= v <= spread[d][1] for d, v in out[name].items())
    shutil.rmtree(root, ignore_errors=True)
    return out


def _allreduce_rank(rank: int, numel: int, store: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    flat = torch.ones(numel)
    dist.all_reduce(flat)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(_common.median(times)))
    dist.destroy_process_group()


def costs(rows: int, tokens: int, repeats: int) -> dict:
    import ray

    from mopd.learner.objective_table import PolicyConfig
    from mopd.learner.policy import policy_loss
    from mopd.learner.rollout import rollout
    from mopd.sampling.grouped import grouped_sampler
    from mopd.sampling.sampler import sample
    from mopd.teachers.panel import TeacherPanel

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="scale_costs_"))
    paths = _common.build_models(tmp, n_teachers=3)
    from mopd.models.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(tmp / "tokenizer")
    student = load_model(paths["student"])
    teachers = {f"teacher{i}": load_model(paths[f"teacher{i}"]).eval().requires_grad_(False) for i in range(3)}
    panel = TeacherPanel(models=teachers, teacher_of_domain={d: f"teacher{i}" for i, d in enumerate(_common.DOMAINS)})
    settings = _common.mopd_settings(tokens, "sampled").model_copy(update={"group_size": 2})
    problems = _common.problems(rows // 2)
    domains = {p.domain: _common.get_domain(p.domain) for p in problems}
    opt = torch.optim.AdamW(student.parameters(), lr=_common.LR)
    keys = ("sample (whole batch)", "sample (group by group)", "sample (8 groups per call)", "teacher scoring",
            "loss+backward+AdamW")
    t: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats + 1):
        def gen(r: int = r) -> torch.Generator:
            return torch.Generator().manual_seed(r)

        t0 = time.perf_counter()
        batch, _ = rollout(student, tok, problems, domains, settings, temperature=1.0, generator=gen())
        t1 = time.perf_counter()
        rollout(student, tok, problems, domains, settings, temperature=1.0, generator=gen(),
                sampler=grouped_sampler(sample))
        t2 = time.perf_counter()
        rollout(student, tok, problems, domains, settings, temperature=1.0, generator=gen(),
                sampler=grouped_sampler(sample, 8))  # `rollout: {groups_per_call: 8}`, the default
        t2b = time.perf_counter()
        panel.sampled_logprobs(batch, panel.route(batch))
        t3 = time.perf_counter()
        loss, _ = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                              temperature=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if r:  # the first is a warm-up
            for k, v in zip(keys, (t1 - t0, t2 - t1, t2b - t2, t3 - t2b, t4 - t3), strict=True):
                t[k].append(v)
    out = {k: round(_common.median(v), 4) for k, v in t.items()}
    out["update (loss+backward+AdamW less scoring)"] = round(out["loss+backward+AdamW"] - out["teacher scoring"], 4)
    params = sum(p.numel() for p in student.parameters())
    # weight sync: the learner puts its weights in the object store once, a rollout actor loads them
    from mopd.runtime import start_local_ray

    start_local_ray(ray, num_cpus=2, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Loader:
        def __init__(self, model):
            self.model = model

        def load(self, box):
            self.model.load_state_dict(ray.get(box[0]))
            return 0

    actor = Loader.remote(student)
    ray.get(actor.load.remote([ray.put(student.state_dict())]))  # warm-up
    sync = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref = ray.put({k: v.detach().clone() for k, v in student.state_dict().items()})
        ray.get(actor.load.remote([ref]))
        sync.append(time.perf_counter() - t0)
    ray.shutdown()
    out["weight sync (put + actor load)"] = round(_common.median(sync), 4)
    mp.start_processes(_allreduce_rank, args=(params, str(tmp / "store"), repeats, str(tmp / "ar")), nprocs=2,
                       join=True, start_method="fork")
    out["gradient all-reduce (2 gloo ranks)"] = round(json.loads((tmp / "ar").read_text()), 4)
    out.update(rows=rows, tokens=tokens, student_params=params, threads=1, machine=_common.machine())
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def step_seconds(student_b: float, teachers_b: list[float], rows: int, prompt: int, tokens: int, rollout_gpus: int,
                 learner_gpus: int, a: dict = ASSUME) -> dict[str, float]:
    """Projected seconds of one synchronous step (max_lag 0): decode on R engines, K teachers' prefill at the
    same time on their own GPUs (each a 1/K share of the rows), the update on L DDP ranks, the gradient
    all-reduce, the weight sync; and of a step with max_lag 1, whose sampling overlaps the rest."""
    flops = a["bf16_tflops"] * 1e12 * a["mfu"]
    n_s = student_b * 1e9
    per_engine = rows / rollout_gpus
    # a decode step reads the weights once (memory bound) or computes 2N per row (compute bound)
    decode = tokens * max(2 * n_s / (a["hbm_tb_s"] * 1e12), 2 * n_s * per_engine / flops)
    scoring = max((2 * t * 1e9 * (rows / max(1, len(teachers_b))) * (prompt + tokens) / flops
                   for t in teachers_b), default=0.0)
    update = 6 * n_s * rows * (prompt + tokens) / flops / learner_gpus
    allreduce = 0.0 if learner_gpus == 1 else 2 * (learner_gpus - 1) / learner_gpus * 4 * n_s / (a["nvlink_gb_s"] * 1e9)
    sync = 2 * n_s / (a["host_copy_gb_s"] * 1e9) * 2  # device -> object store -> each engine (engines in parallel)
    parts = {"sampling": decode, "teacher scoring": scoring, "update": update, "all-reduce": allreduce,
             "weight sync": sync}
    # max_lag 1: the next step's sampling (and its weight sync) overlaps this step's scoring and update
    overlapped = max(decode + sync, scoring + update + allreduce)
    return {**{k: round(v, 2) for k, v in parts.items()}, "step": round(sum(parts.values()), 2),
            "step with max_lag 1": round(overlapped, 2)}


def largest(a: dict = ASSUME) -> list[dict]:
    """The largest student (DDP: the whole training state on each learner GPU; FSDP: rank 0's share, see
    `fsdp`) and the largest of 3 teachers
    (bf16 weights, a quarter of each GPU left to the KV cache; a teacher on g GPUs is tensor parallel, which
    means vLLM behind `backend: http`), for ways of dividing 8 GPUs."""
    usable = a["gpu_memory_gb"] * a["usable_fraction"] * 1e9
    student = usable * 0.8 / a["train_bytes_per_param"] / 1e9  # 20% for activations (micro-batches bound them)

    def fsdp(ranks: int) -> float:  # rank 0: its shard of the layers, the replicated rest, the unsharded copy
        f, train = a["layer_fraction"], a["train_bytes_per_param"]
        return usable * 0.8 / (train * f / ranks + train * (1 - f) + a["copy_bytes_per_param"]) / 1e9

    teacher_per_gpu = usable * (1 - a["kv_fraction"]) / a["serve_bytes_per_param"] / 1e9
    out = []
    for learner, rollout, teachers in ((2, 2, 4), (3, 2, 3), (1, 1, 6), (2, 1, 5), (4, 1, 3)):
        per_teacher = [teachers // 3 + (i < teachers % 3) for i in range(3)]
        out.append({"learner GPUs": learner, "rollout GPUs (vLLM)": rollout, "teacher GPUs": teachers,
                    "largest student, DDP (B params)": round(student, 1),
                    "largest student, FSDP over the learner GPUs (B params)": round(fsdp(learner), 1) if learner > 1 else None,
                    "3 teachers, largest each (B params, tensor parallel over its GPUs)":
                        [round(g * teacher_per_gpu, 0) for g in per_teacher]})
    return out


def project() -> dict:
    shapes = {"student 1.7B, 3 teachers 8B": (1.7, [8, 8, 8]), "student 3B, 3 teachers 14B": (3.0, [14, 14, 14])}
    table = {}
    for name, (s, t) in shapes.items():
        for r, learner in ((1, 1), (2, 2), (2, 3)):  # with one GPU per teacher: 5, 7 and 8 GPUs
            table[f"{name}, R={r}, L={learner}"] = step_seconds(s, t, rows=512, prompt=256, tokens=1024,
                                                                rollout_gpus=r, learner_gpus=learner)
    return {"assumptions": ASSUME, "batch": "512 rows x (256 prompt + 1024 completion tokens)",
            "step seconds": table, "what fits 8 x 80 GB": largest(), "measured on a GPU": False}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("same", "costs", "project", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    result = {}
    if args.part in ("costs", "all"):
        result["costs (seconds per step, medians)"] = costs(args.rows, args.tokens, args.repeats)
    if args.part in ("same", "all"):
        result["same numbers"] = same(args.seeds)
    if args.part in ("project", "all"):
        result["projection (GPU, not measured)"] = project()
    print(json.dumps(result, indent=2))
    kept = json.loads(RESULTS.read_text()).get("scale_model", {}) if RESULTS.exists() else {}
    update_results("scale_model", {**kept, **result})  # a part run alone keeps the others' figures


if __name__ == "__main__":
    main()
