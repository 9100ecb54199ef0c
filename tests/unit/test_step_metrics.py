"""The stage's step hook: every step of rank 0 reaches the run, from a pickled copy too."""

from __future__ import annotations

import pickle

from mlflow import MlflowClient

from lladav.lineage import StepMetrics


def test_every_step_of_rank_0_is_logged_by_a_shipped_hook(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    hook = StepMetrics(uri, run_id)
    hook(1, 0, {"step": 1, "loss": 2.0, "frozen": True})
    shipped = pickle.loads(pickle.dumps(hook))  # as Ray ships it to a worker, client and all
    for step in (2, 3):
        shipped(step, 0, {"step": step, "loss": 1.0 / step})
        shipped(step, 1, {"step": step, "loss": 9.0})  # other ranks log nothing
        history = client.get_metric_history(run_id, "loss")
        assert sorted(int(m.step) for m in history) == list(range(1, step + 1))
    metrics = client.get_run(run_id).data.metrics
    assert metrics["loss"] == 1.0 / 3 and "frozen" not in metrics  # bools are not metrics
