"""MLflow: by default a SQLite store inside the run directory (RUN/tracking/mlflow.db, artifacts beside it), so
`mlflow ui --backend-store-uri sqlite:///RUN/tracking/mlflow.db` shows it with no server; a resumed mopd run
finds its MLflow run again by the `mopd.run_id` tag.

The config goes in as params (flattened `recipe.stages.sft.lr`; MLflow keeps params immutable, so they are
written once, when the MLflow run is created) and whole as the artifact config.json.
"""

from __future__ import annotations

import time

from ..core.schema import MlflowSettings
from .base import TrackerRun

RUN_ID_TAG = "mopd.run_id"
_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch


def default_tracking_uri(run: TrackerRun) -> str:
    return f"sqlite:///{(run.directory / 'mlflow.db').resolve()}"


class MlflowTracker:
    def __init__(self, settings: MlflowSettings, run: TrackerRun):
        from mlflow.tracking import MlflowClient

        run.directory.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=settings.tracking_uri or default_tracking_uri(run))
        name = settings.experiment or run.project
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None if settings.tracking_uri else (run.directory / "mlflow-artifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run.run_id}'")
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run.run_name,
                                                 tags={RUN_ID_TAG: run.run_id}).info.run_id
            self._log_config(run.config)

    def _log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:_PARAM_CHARS]) for k, v in _flat_params(config).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """An MLflow table artifact per key (`<key>.json`; MLflow appends to it), shown in the run's Evaluation
        view; the step is a column."""
        data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{key}.json")

    def summary(self, values: dict[str, float], step: int) -> None:
        self.log({f"summary/{k}": v for k, v in values.items()}, step)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat_params(value, f"{name}."))
        else:
            out[name] = str(value)
    return out
