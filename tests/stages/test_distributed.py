"""pretrain on 2 processes (torchrun, gloo on CPU): DDP and FSDP reproduce the single-process run
with the same global batch; checkpoints move between world sizes; a dying rank fails the job.

One torchrun launch in all (each costs 10-20 s of start-up here): `_dist_worker.py` runs every
multi-process case in it and ends with the one that loses a rank; the single-process references and
resumes run in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llmctl.core.artifacts import partial_path
from llmctl.core.checkpoint import iter_shard_weights, load_checkpoint
from llmctl.core.config import to_dict
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.runtime import Runtime
from llmctl.core.train_loop import read_metrics
from llmctl.stages import pretrain

WORKER = Path(__file__).with_name("_dist_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
# 2 ranks x 4 rows x 32 tokens = 256 per micro-step: 2 micro-steps (DDP's no_sync) per 512-token
# step; a tight clip so that clipping acts on the (sharded) gradients; checkpoints at 3 and 5.
SETTINGS = {
    "batch_tokens": 512,
    "micro_batch": 4,
    "grad_clip": 0.5,
    "max_steps": 5,
    "save_every": 3,
}

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def torchrun(
    cfg: pretrain.PretrainConfig, out: Path, procs: int = 2, *case: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCTL_DIST_TIMEOUT": "60"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(procs), str(WORKER)]
    return subprocess.run(
        [*cmd, str(out), json.dumps(to_dict(cfg)), *case],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=Path(__file__).parents[2],
    )


def assert_same_run(ref_dir: Path, run_dir: Path, atol: float = 1e-5) -> None:
    """The run's 5 losses are the reference's within 1e-4 and its final weights within `atol`."""
    ref, par = losses(ref_dir), losses(run_dir)
    assert sorted(par) == [1, 2, 3, 4, 5]
    assert max(abs(par[s] - ref[s]) for s in ref) < 1e-4, (ref, par)
    a = load_checkpoint(ref_dir).model.state_dict()
    b = load_checkpoint(run_dir).model.state_dict()  # gathered into one file
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def copy_checkpoint(run: Path, step: int, to: Path) -> None:
    """Put `run`'s checkpoint of `step` where `pretrain --resume -o to` looks for it."""
    name = f"step-{step:07d}"
    shutil.copytree(run / "checkpoints" / name, partial_path(to) / "checkpoints" / name)


@dataclass
class Runs:
    out: Path
    launch: subprocess.CompletedProcess

    def __truediv__(self, name: str) -> Path:
        return self.out / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path, tiny_pretrain) -> Runs:
    """OUT/ref (one process, 8 rows per micro-step) and, from one torchrun launch with 4 rows on
    each of 2 ranks, OUT/ddp, OUT/fsdp, OUT/sharded (FSDP, sharded checkpoints) and the 2-rank
    resumes from their step-3 checkpoints, OUT/resume2 and OUT/resume2s; the tensor-parallel
    cases (see _dist_worker.py); last OUT/crash."""
    out = tmp_path_factory.mktemp("dist")
    pretrain.run(out / "ref", tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8}))
    res = torchrun(tiny_pretrain(tokens_dir, **SETTINGS), out)
    assert (out / "resume2s" / "manifest.json").is_file(), res.stderr[-3000:]
    return Runs(out, res)


@pytest.mark.slow  # one torchrun launch: DDP, FSDP and a 2-rank resume
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "sharded"])
def test_two_ranks_match_one_process(runs: Runs, mode: str) -> None:
    assert_same_run(runs / "ref", runs / mode, atol=1e-4)
    assert json.loads((runs / mode / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp_init_from_a_checkpoint_matches_one_process(
    runs: Runs, tokens_dir: Path, tiny_pretrain
) -> None:
    over = {**SETTINGS, "micro_batch": 8, "init": str(runs / "fsdp"), "max_steps": 2}
    pretrain.run(runs / "init1", tiny_pretrain(tokens_dir, **over))
    one, two = losses(runs / "init1"), losses(runs / "init2")
    assert sorted(two) == [1, 2]
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    assert two[1] < losses(runs / "ref")[1] - 0.1  # it starts from the trained weights


@pytest.mark.slow
@pytest.mark.parametrize(("run", "resumed"), [("fsdp", "resume2"), ("sharded", "resume2s")])
def test_fsdp_checkpoint_resumes_on_two_ranks_and_on_one(
    runs: Runs, tokens_dir: Path, tiny_pretrain, run: str, resumed: str
) -> None:
    ref = losses(runs / "ref")
    two = losses(runs / resumed)
    assert sorted(two) == [4, 5]
    # One process with the 8 rows per micro-step of the 2 ranks together.
    one = runs / f"{run}-resume1"
    copy_checkpoint(runs / run, 3, one)
    m = pretrain.run(one, tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8}), resume=True)
    assert m.stats["resumed_from_step"] == 3
    one_l = losses(one)
    for s in (4, 5):
        assert abs(two[s] - ref[s]) < 1e-4, (s, ref, two)
        assert abs(one_l[s] - ref[s]) < 1e-4, (s, ref, one_l)
    # Another cut of the same steps (4 rows x 4 micro-steps in one process): the same batches.
    other = runs / f"{run}-resume1b"
    copy_checkpoint(runs / run, 3, other)
    pretrain.run(other, tiny_pretrain(tokens_dir, **SETTINGS), resume=True)
    for s in (4, 5):
        assert abs(losses(other)[s] - ref[s]) < 1e-4, (s, ref, losses(other))


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_in_one_process(runs: Runs) -> None:
    ck = runs / "sharded" / "checkpoints" / "step-0000003"
    assert (ck / "shards").is_dir()
    assert not (ck / "model.safetensors").exists()
    a = load_checkpoint(runs / "fsdp" / "checkpoints" / "step-0000003").model.state_dict()
    with pytest.raises(InputError, match="sharded checkpoint"):
        load_checkpoint(ck)  # a pickle inside: not loaded unasked
    b = load_checkpoint(ck, trust_shards=True).model.state_dict()  # what LLMCTL_TRUST_SHARDS=1 does
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Tensor by tensor (what `--init` under FSDP/TP reads): the same values, a tied head once.
    with pytest.raises(InputError, match="sharded checkpoint"):
        iter_shard_weights(ck)
    c = dict(iter_shard_weights(ck, trust_shards=True))
    assert c.keys() == {k for k in a if k != "lm_head.weight"} or c.keys() == a.keys()
    assert all(torch.equal(a[k], c[k]) for k in c)


@pytest.mark.slow
def test_a_dying_rank_fails_the_job_and_keeps_the_last_checkpoint(runs: Runs) -> None:
    res = runs.launch
    assert res.returncode != 0
    report = res.stdout + res.stderr
    assert "ChildFailedError" in report, report[-3000:]
    assert "rank      : 1 (local_rank: 1)" in report
    assert "exitcode  : 7" in report
    assert not (runs / "crash").exists()  # never looks finished
    ck = partial_path(runs / "crash") / "checkpoints" / "step-0000003"
    assert load_checkpoint(ck, trust_shards=True).model_config.n_layers == 2


@pytest.mark.slow
def test_the_tensor_parallel_forward_equals_the_unsharded_model(runs: Runs) -> None:
    res = json.loads((runs / "tp_forward.json").read_text())
    assert res["max_diff"] < 1e-5
    assert res["wq_rows"] == 16  # each rank holds 2 of the 4 query heads (8 dims each)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tp", "tpfsdp"])
def test_tensor_parallel_runs_match_one_process(runs: Runs, mode: str) -> None:
    """--tp 2 on 2 ranks (one data-parallel group: each reads all 8 rows), alone and under FSDP
    on the 1 x 2 mesh; the checkpoint comes out in the fused one-process layout."""
    assert_same_run(runs / "ref", runs / mode)
    assert json.loads((runs / mode / "trainer_state.json").read_text())["tp"] == 2


@pytest.mark.slow
def test_tensor_parallel_checkpoints_resume_on_two_ranks_and_in_one_process(
    runs: Runs, tokens_dir: Path, tiny_pretrain
) -> None:
    ref, two = losses(runs / "ref"), losses(runs / "resume2tp")  # from TP+FSDP's sharded step 3
    assert sorted(two) == [4, 5]
    # TP's one-file checkpoint (optimizer moments in the fused order) resumes without TP.
    one = runs / "tp-resume1"
    copy_checkpoint(runs / "tp", 3, one)
    pretrain.run(one, tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8}), resume=True)
    for s in (4, 5):
        assert abs(two[s] - ref[s]) < 1e-4, (s, ref, two)
        assert abs(losses(one)[s] - ref[s]) < 1e-4, (s, ref, losses(one))
    # TP's sharded checkpoint (unfused names) reads as the fused model in one process.
    shards = runs / "tpfsdp" / "checkpoints" / "step-0000003"
    a = load_checkpoint(runs / "tp" / "checkpoints" / "step-0000003").model.state_dict()
    b = load_checkpoint(shards, trust_shards=True).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    c = dict(iter_shard_weights(shards, trust_shards=True))  # the q/k/v parts joined again
    assert "layers.0.attn.wqkv.weight" in c
    assert all(torch.equal(b[k], c[k]) for k in c)
    # ...but its optimizer shards only fit the same --tp.
    copy_checkpoint(runs / "tpfsdp", 3, runs / "tp-resume1s")
    cfg = tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8})
    with pytest.raises(ConfigError, match="sharded checkpoint of a --tp 2 run"):
        pretrain.run(runs / "tp-resume1s", cfg, resume=True)
    # ...and --pp reads none (checked where a --pp run looks for its checkpoint).
    pp = tiny_pretrain(tokens_dir, **{**SETTINGS, "pp": 2, "parallel": "ddp"})
    meta = pretrain.build_on_meta(pp.model_config(512))
    rt = Runtime.detect("cpu", "fp32")
    run_dir = partial_path(runs / "tp-resume1s")
    with pytest.raises(ConfigError, match="sharded checkpoint, which --pp does not read"):
        pretrain._resume(run_dir, pp, meta, rt, into_model=False)


@pytest.mark.slow
def test_fsdp_init_from_a_tensor_parallel_sharded_checkpoint_matches_one_process(
    runs: Runs, tokens_dir: Path, tiny_pretrain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2-rank FSDP --init from TP+FSDP's DCP shards (q/k/v stored apart) equals one process
    --init from the same shards, read whole."""
    shards = runs / "tpfsdp" / "checkpoints" / "step-0000003"
    monkeypatch.setenv("LLMCTL_TRUST_SHARDS", "1")
    over = {**SETTINGS, "micro_batch": 8, "init": str(shards), "max_steps": 2}
    pretrain.run(runs / "init1tps", tiny_pretrain(tokens_dir, **over))
    one, two = losses(runs / "init1tps"), losses(runs / "init2tps")
    assert sorted(two) == [1, 2]
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4, (one, two)
    assert two[1] < losses(runs / "ref")[1] - 0.1  # it starts from the trained weights


def val_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r][-1]["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "tied"), [("pp", True), ("ppgpipe", False)])
def test_pipeline_parallel_runs_match_one_process(
    runs: Runs, tokens_dir: Path, tiny_pretrain, mode: str, tied: bool
) -> None:
    """--pp 2: 1F1B with a tied head (its two copies kept equal), GPipe untied; training and
    validation losses and the gathered checkpoint are those of one process."""
    ref_dir = runs / "ref"
    if not tied:
        ref_dir = runs / "ref-untied"
        if not ref_dir.exists():
            cfg = tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8}, tie_embeddings=False)
            pretrain.run(ref_dir, cfg)
    assert_same_run(ref_dir, runs / mode)
    assert abs(val_loss(runs / mode) - val_loss(ref_dir)) < 1e-4
    assert json.loads((runs / mode / "trainer_state.json").read_text())["pp"] == 2


@pytest.mark.slow
def test_pipelines_in_data_parallel_match_one_process(
    runs: Runs, tokens_dir: Path, tiny_pretrain
) -> None:
    """4 processes: 2 pipelines of 2 stages, each pipeline on its 4 rows of every micro-step,
    gradients averaged stage by stage."""
    res = torchrun(tiny_pretrain(tokens_dir, **SETTINGS), runs.out, 4, "pp-dp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(runs / "ref", runs / "pp2dp2")
    assert abs(val_loss(runs / "pp2dp2") - val_loss(runs / "ref")) < 1e-4
    # The same launch materialised a TP 2 x FSDP 2 model with uneven shards from the meta device.
    diffs = json.loads((runs / "materialize_2d.json").read_text())
    assert all(any(part in k for k in diffs) for part in ("attn.wq.", "mlp.w1.", "embed."))
    assert max(diffs.values()) == 0.0, diffs


@pytest.mark.slow
def test_pipeline_checkpoints_move_between_one_process_and_two_stages(
    runs: Runs, tokens_dir: Path, tiny_pretrain
) -> None:
    ref = losses(runs / "ref")
    two = losses(runs / "resume2pp")  # DDP's one-file step 3, resumed as a pipeline
    one = runs / "pp-resume1"
    copy_checkpoint(runs / "pp", 3, one)  # the pipeline's step 3, resumed in one process
    pretrain.run(one, tiny_pretrain(tokens_dir, **{**SETTINGS, "micro_batch": 8}), resume=True)
    for s in (4, 5):
        assert abs(two[s] - ref[s]) < 1e-4, (s, ref, two)
        assert abs(losses(one)[s] - ref[s]) < 1e-4, (s, ref, losses(one))


@pytest.mark.slow
def test_fsdp_under_bf16_gathers_bf16_weights_and_reduces_in_fp32(runs: Runs) -> None:
    policy = json.loads((runs / "mp_policy.json").read_text())
    assert policy == {
        "compute": "torch.bfloat16",
        "master": "torch.float32",
        "grad": "torch.float32",
    }
    ref, bf16 = losses(runs / "ref"), losses(runs / "fsdpbf16")
    assert sorted(bf16) == [1, 2, 3, 4, 5]
    assert max(abs(bf16[s] - ref[s]) for s in ref) < 0.05, (ref, bf16)  # bf16 rounding only


@pytest.mark.parametrize(
    ("over", "world", "message"),
    [
        ({"tp": 2}, 1, "--tp 2 does not divide the 1 process"),
        ({"tp": 2}, 4, "4 processes but --parallel none"),
        ({"pp": 2}, 3, "--pp 2 needs a multiple of 2 processes"),
        ({"pp": 2}, 4, "4 processes but --parallel none"),
        ({"pp": 2, "micro_batch": 6, "pp_chunks": 4}, 2, "--pp-chunks 4 must divide"),
        ({"pp": 2, "parallel": "fsdp"}, 2, "--pp combines with --parallel ddp"),
    ],
)
def test_parallel_layouts_that_cannot_work_are_refused(
    tokens_dir: Path, tiny_pretrain, over: dict, world: int, message: str
) -> None:
    rt = Runtime(torch.device("cpu"), "fp32", rank=0, world_size=world)
    with pytest.raises(ConfigError, match=message):
        pretrain.run(Path("unused"), tiny_pretrain(tokens_dir, **over), runtime=rt)
    with pytest.raises(ConfigError, match="--tp with --parallel ddp"):
        tiny_pretrain(tokens_dir, tp=2, parallel="ddp")


def test_several_processes_without_a_parallel_mode_are_refused(
    tokens_dir: Path, tiny_pretrain
) -> None:
    rt = Runtime(torch.device("cpu"), "fp32", rank=0, world_size=2)
    with pytest.raises(ConfigError, match="2 processes but --parallel none") as e:
        pretrain.run(Path("unused"), tiny_pretrain(tokens_dir), runtime=rt)
    assert "--parallel ddp" in e.value.hint
