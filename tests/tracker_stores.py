"""Read back what each experiment tracker wrote, with the tracker's own reader where it has one, as
{(global step, key): [values]} (a key logged twice at one step has two values).

W&B has no Python reader of its offline run files any more (wandb >= 0.19 moved the writer into its Go core);
`wandb_points` reads the file's documented layout: a 7-byte header (":W&B", magic, version), then LevelDB-log
chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) in 32 KiB blocks, each whole
record one of wandb's own protobuf `Record` messages.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

Points = dict[tuple[int, str], list[float]]


def jsonl_points(run_dir: Path, offsets: dict[str, int]) -> Points:
    """What metrics.jsonl holds, at the global steps the trackers use (stage offset + step)."""
    from mopd.tracking import numbers

    points: Points = defaultdict(list)
    for stage, offset in offsets.items():
        for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            for key, value in numbers(record).items():
                points[(offset + int(record["step"]), f"{stage}/{key}")].append(value)
    return dict(points)


def tensorboard_points(logdir: Path) -> Points:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    points: Points = defaultdict(list)
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            points[(event.step, tag)].append(event.value)
    return dict(points)


def mlflow_points(db: Path) -> tuple[Points, list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    points: Points = defaultdict(list)
    for run in runs:
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                points[(m.step, key)].append(m.value)
    return dict(points), runs


def trackio_points(project: str) -> tuple[Points, list[str]]:
    from trackio.sqlite_storage import SQLiteStorage

    points: Points = defaultdict(list)
    runs = SQLiteStorage.get_runs(project)
    for run in runs:
        for row in SQLiteStorage.get_logs(project, run=run):
            for key, value in row.items():
                if key not in ("step", "timestamp") and isinstance(value, int | float):
                    points[(row["step"], key)].append(float(value))
    return dict(points), runs


def wandb_records(path: Path):
    """The protobuf records of one offline .wandb file."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)


def wandb_points(directory: Path) -> tuple[Points, dict[str, float], set[str]]:
    """History points, the last summary values and the run ids of every offline run file under `directory`."""
    points: Points = defaultdict(list)
    summary: dict[str, float] = {}
    ids: set[str] = set()
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        points[(step, key)].append(float(json.loads(item.value_json)))
            elif kind == "summary":
                for item in record.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        summary[key] = json.loads(item.value_json)
    return dict(points), summary, ids


def tensorboard_texts(logdir: Path) -> dict[tuple[int, str], str]:
    """The text summaries (TensorBoard's text plugin) as {(step, tag): markdown}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        for event in acc.Tensors(tag):
            out[(event.step, tag)] = event.tensor_proto.string_val[0].decode()
    return out


def wandb_table_keys(directory: Path) -> list[str]:
    """The history keys of every offline run file under `directory` whose value is a W&B table."""
    keys = []
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:  # a table is logged as nested keys: <key>/_type = "table-file"
                    key = item.key or "/".join(item.nested_key)
                    if key.endswith("/_type") and json.loads(item.value_json) == "table-file":
                        keys.append(key.rsplit("/", 1)[0])
    return keys


def trackio_tables(project: str) -> list[tuple[int, str, object]]:
    """(step, key, value) of every logged value that is not a number."""
    from trackio.sqlite_storage import SQLiteStorage

    out = []
    for run in SQLiteStorage.get_runs(project):
        for row in SQLiteStorage.get_logs(project, run=run):
            out += [(row["step"], k, v) for k, v in row.items() if k not in ("step", "timestamp")
                    and not isinstance(v, int | float)]
    return out
