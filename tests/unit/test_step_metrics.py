"""The stage's step hook: every step of rank 0 reaches the run, from a shipped copy too, and
the last step returns only once all of them are in the store."""

from __future__ import annotations

import pickle

from mlflow import MlflowClient

from lladav.lineage import StepMetrics


def _run(tmp_path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("x")).info.run_id


def test_every_step_of_rank_0_is_in_the_run_when_the_last_step_returns(tmp_path):
    uri, client, run_id = _run(tmp_path)
    hook = StepMetrics(uri, run_id)
    hook(1, 0, {"step": 1, "total_steps": 40, "loss": 2.0, "frozen": True})
    shipped = pickle.loads(pickle.dumps(hook))  # as Ray ships it to a worker, sender and all
    for step in range(2, 41):
        shipped(step, 0, {"step": step, "total_steps": 40, "loss": 1.0 / step})
        shipped(step, 1, {"step": step, "total_steps": 40, "loss": 9.0})  # other ranks: nothing
    history = client.get_metric_history(run_id, "loss")
    assert sorted(int(m.step) for m in history) == list(range(1, 41))
    metrics = client.get_run(run_id).data.metrics
    assert metrics["loss"] == 1.0 / 40 and "frozen" not in metrics  # bools are not metrics


def test_a_store_that_fails_costs_warnings_not_the_run(tmp_path, caplog):
    _, _, run_id = _run(tmp_path)
    hook = StepMetrics(f"sqlite:///{tmp_path / 'no-such-folder' / 'x.db'}", run_id)
    for step in (1, 2):
        hook(step, 0, {"step": step, "total_steps": 2, "loss": 1.0})
    assert caplog.text.count("could not log step") == 2
