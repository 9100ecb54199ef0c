"""The stage's step hook batches its MLflow writes without losing a step: the first step, a
checkpoint's step and the last step are sent at once, the others when flush_s has passed."""

from __future__ import annotations

import pickle

from mlflow import MlflowClient

from lladav.lineage import StepMetrics


def _run(tmp_path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("x")).info.run_id


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, "loss"))


def test_first_checkpoint_and_last_steps_send_everything_pending(tmp_path):
    uri, client, run_id = _run(tmp_path)
    hook = pickle.loads(pickle.dumps(StepMetrics(uri, run_id, flush_s=3600)))  # as Ray ships it

    def step(n: int, checkpoint: bool = False, rank: int = 0) -> None:
        hook(n, rank, {"step": n, "total_steps": 9, "loss": 1.0 / n, "checkpoint": checkpoint})

    step(1)
    assert _steps(client, run_id) == [1]             # the progress bar sees the stage start
    step(2), step(3), step(3, rank=1)                # other ranks log nothing
    assert _steps(client, run_id) == [1]             # held: within flush_s, no checkpoint
    step(4, checkpoint=True)
    assert _steps(client, run_id) == [1, 2, 3, 4]    # in the store before the checkpoint is
    step(5), step(6), step(7), step(8)
    assert _steps(client, run_id) == [1, 2, 3, 4]
    step(9)                                          # the last step
    assert _steps(client, run_id) == list(range(1, 10))
    metrics = client.get_run(run_id).data.metrics
    assert metrics["loss"] == 1.0 / 9 and "checkpoint" not in metrics  # bools are not metrics


def test_steps_are_sent_once_flush_s_has_passed(tmp_path):
    uri, client, run_id = _run(tmp_path)
    hook = StepMetrics(uri, run_id, flush_s=0.0)
    for n in (1, 2, 3):
        hook(n, 0, {"step": n, "total_steps": 100, "loss": 1.0, "checkpoint": False})
        assert _steps(client, run_id) == list(range(1, n + 1))


def test_a_store_that_fails_costs_warnings_not_the_run(tmp_path, caplog):
    _, _, run_id = _run(tmp_path)
    hook = StepMetrics(f"sqlite:///{tmp_path / 'no-such-folder' / 'x.db'}", run_id)
    for n in (1, 2):
        hook(n, 0, {"step": n, "total_steps": 2, "loss": 1.0})
    assert caplog.text.count("could not log step") == 2
