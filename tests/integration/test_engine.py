"""Real 2-rank ZeRO-3 over gloo (torchrun), then the streamed export read back by transformers.

The worker (_engine_worker.py) runs once per session: train 10 steps with a checkpoint after 6,
resume a fresh engine from it, save a final checkpoint, and dump what each rank saw. The export
runs here, in the test process, as train/launch.py runs it on the driver.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_engine_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _run_worker(out: Path, ranks: int) -> list[dict]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    # The venv's bin first on PATH: torch JIT-builds DeepSpeed ops (CPU Adam under offload) with
    # whichever ninja it finds, and the system's and the venv's hash builds differently.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, *(launcher if ranks > 1 else []), str(WORKER),
                           "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"worker exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> tuple[Path, list[dict]]:
    """The two-rank run, once per `make test` however many xdist workers draw this module's
    tests (pytest-xdist's recipe: the first worker runs it under a file lock in the folder all
    workers share, the others read its outputs, which the tests only read)."""
    from filelock import FileLock

    if worker_id == "master":  # no xdist
        out = tmp_path_factory.mktemp("engine")
        return out, _run_worker(out, ranks=2)
    out = tmp_path_factory.getbasetemp().parent / "engine-shared"
    with FileLock(str(out) + ".lock"):
        if not (out / "rank1.json").exists():
            out.mkdir(exist_ok=True)
            _run_worker(out, ranks=2)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_the_masked_row_head_gives_full_logits_loss_and_gradients_under_zero3(run):
    """Issue 14: hidden states + the chunked head on masked rows, against full (B, L, V)
    logits + diffusion_loss, on 2-rank ZeRO-3 (each rank its own batch, fp32)."""
    for rank in run[1]:
        head = rank["head"]
        assert abs(head["loss_rows"] - head["loss_full"]) < 1e-5, head
        assert head["same_names"] and head["params"] > 20
        assert head["max_grad"] > 1e-3 and head["max_grad_diff"] < 1e-5, head


def test_every_parameter_is_split_across_the_two_ranks(run):
    _, ranks = run
    for result in ranks:
        assert result["world"] == 2
        for name, (full, local, visible) in result["partition"].items():
            assert local == math.ceil(full / 2), name
            assert visible == 0, f"{name} is whole outside a gather"
    embed = ranks[0]["partition"]["language_model.model.embed_tokens.weight"]
    assert embed[:2] == [64 * 64, 64 * 64 // 2]
    assert ranks[1]["gathered_elsewhere"] == 0  # gather_full_state_dict: rank 0 only


def test_no_rank_builds_deepspeeds_shm_all_reduce(run):
    # init_distributed skips that JIT build on the CPU (training never calls the op)
    assert [r["shm_comm_built"] for r in run[1]] == [False, False]


def test_loss_falls_and_each_group_follows_its_schedule(run):
    _, ranks = run
    for result in ranks:
        losses = result["losses"]
        assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses
        # warm-up is ceil(0.1 * 10) = 1 step: the first update has lr 0
        assert losses[1] == losses[0]
        first, last = result["lrs"][0], result["lrs"][-1]
        assert first == pytest.approx([1e-3, 3e-3])  # projector, language_model
        assert last == pytest.approx([0.0, 0.0], abs=1e-12)


def test_resume_repeats_the_uninterrupted_run_exactly(run):
    _, ranks = run
    for rank, result in enumerate(ranks):
        assert result["client"] == {"step": 6, "rank": rank, "rng_ok": True}
        assert result["resumed_losses"] == result["losses"][6:]  # bit for bit, fp32
        assert result["resumed_lrs"] == result["lrs"][6:]


def test_frozen_tower_is_bit_identical_after_training(run):
    _, ranks = run
    assert ranks[0]["tower_tensors"] > 10 and ranks[0]["tower_identical"] is True


def test_load_state_into_fills_a_partitioned_model_from_rank_0(run):
    _, ranks = run
    assert ranks[0]["load_exact"] is True
    for result in ranks:
        assert result["load_report"] == [[], []]
        assert "unexpected ['extra.weight']" in result["strict_error"]


def test_a_process_without_launcher_env_trains_as_a_world_of_one(tmp_path):
    (result,) = _run_worker(tmp_path, ranks=1)
    assert result["world"] == 1
    assert all(local == full for full, local, _ in result["partition"].values())
    assert result["resumed_losses"] == result["losses"][6:] and result["load_exact"] is True


def _logits(model, ids):
    sys.path.insert(0, str(WORKER.parent))
    from _engine_worker import logits_of

    model.eval()
    with torch.no_grad():
        return logits_of(model, ids)


def test_streamed_export_loads_in_transformers_with_the_engines_logits(run, tmp_path):
    from lladav.model.lladav import LLaDAVConfig, LLaDAVModel
    from lladav.train.export import export_consolidated

    out, _ = run
    config = LLaDAVConfig.from_pretrained(out / "final")
    names = export_consolidated(str(out / "final"), str(tmp_path / "export"), config,
                                max_shard_bytes=64_000)
    files = sorted(os.listdir(tmp_path / "export"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(names)
    assert set(index["weight_map"].values()) == set(shards)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no staging left behind

    model = LLaDAVModel.from_pretrained(tmp_path / "export")
    gathered = torch.load(out / "gathered.pt")
    state = model.state_dict()
    assert set(state) == set(gathered) == set(names)
    assert all(v.dtype == torch.float32 and torch.equal(v, gathered[k]) for k, v in state.items())
    probe, engine_logits = torch.load(out / "probe.pt"), torch.load(out / "engine_logits.pt")
    torch.testing.assert_close(_logits(model, probe), engine_logits, atol=1e-5, rtol=0)

    export_consolidated(str(out / "final"), str(tmp_path / "export"), config,
                        dtype=torch.bfloat16)  # replaces the folder
    half = LLaDAVModel.from_pretrained(tmp_path / "export")
    assert half.dtype == torch.bfloat16
    assert all(torch.equal(v, gathered[k].to(torch.bfloat16)) for k, v in half.state_dict().items())


def test_export_to_s3_round_trips(run, s3_bucket):
    from lladav import storage
    from lladav.model.lladav import LLaDAVConfig, LLaDAVModel
    from lladav.train.export import export_consolidated

    out, _ = run
    uri = f"{s3_bucket}/exports/tiny"
    export_consolidated(str(out / "final"), uri, LLaDAVConfig.from_pretrained(out / "final"),
                        max_shard_bytes=200_000)
    listed = [u.rsplit("/", 1)[1] for u in storage.list_uris(uri)]
    assert "config.json" in listed and "model.safetensors.index.json" in listed
    with storage.local_folder(uri) as folder:
        model = LLaDAVModel.from_pretrained(folder)
    gathered = torch.load(out / "gathered.pt")
    assert all(torch.equal(v, gathered[k]) for k, v in model.state_dict().items())
