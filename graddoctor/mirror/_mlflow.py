"""MLflow: each flush's metrics as `log_batch` calls with explicit steps (MLflow takes them in any order)."""
from __future__ import annotations

import time
from typing import Any, Optional

from ._base import Mirror
from ._rows import GRAD_NORM, PREFIX, UPDATE_RATIO

# MLflow's file store keeps a metric as a file named by its key, so a key cannot also be the folder of
# other keys (`graddoctor/grad_norm` beside `graddoctor/grad_norm/<block>`): the global series get a leaf.
LEAF = {GRAD_NORM: GRAD_NORM + "/global", UPDATE_RATIO: UPDATE_RATIO + "/global"}
BATCH = 1000  # MLflow's limit of metrics per log_batch request
FINDINGS_FILE = PREFIX + "findings.txt"


class MLflowMirror(Mirror):
    """Mirror to an MLflow run: metrics with their steps (NaN and Inf kept as they are), and the findings
    as the text artifact `graddoctor/findings.txt` (rewritten with every new finding).

    In MLflow the global series are `graddoctor/grad_norm/global` and `graddoctor/update_ratio/global`
    (see LEAF); every other tag is as elsewhere.

    Args:
      run_id: the run's id (`mlflow.active_run().info.run_id`).
      tracking_uri: its tracking URI; None: MLflow's current one (`mlflow.get_tracking_uri()`).
    """

    def __init__(self, run_id: str, tracking_uri: Optional[str] = None):
        from mlflow import MlflowClient
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self._metrics: list[Any] = []
        self._findings: list[str] = []
        self._findings_changed = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        ms = int(time.time() * 1000)
        self._metrics.extend(Metric(LEAF.get(tag, tag), value, ms, step) for tag, value in values.items())

    def text(self, step: int, tag: str, text: str) -> None:
        self._findings.append(f"step {step} [{tag}] {text}")
        self._findings_changed = True

    def flush(self) -> None:
        metrics, self._metrics = self._metrics, []
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])
        if self._findings_changed:
            self.client.log_text(self.run_id, "\n".join(self._findings) + "\n", FINDINGS_FILE)
            self._findings_changed = False
