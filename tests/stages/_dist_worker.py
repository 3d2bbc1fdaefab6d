"""Run by test_distributed.py under `torchrun --nproc_per_node 2`, not collected by pytest.

Each torchrun launch costs 10-20 s of start-up on 2 cores, so the one launch (`_dist_worker.py OUT
JSON`) runs every multi-process case in one process group (`pretrain.run` leaves a group it did not
create alone), in this order:

    OUT/ddp       DDP, through the CLI
    OUT/fsdp      FSDP; OUT/resume2 resumes from its step-3 checkpoint
    OUT/sharded   FSDP with sharded checkpoints; OUT/resume2s resumes from its sharded step 3
    OUT/tp_forward.json  logits of a tensor-parallel model against the unsharded one
    OUT/tp        tensor parallel over both ranks (--tp 2, no data parallelism)
    OUT/tpfsdp    TP + FSDP on the 1 x 2 (dp x tp) mesh, sharded checkpoints; OUT/resume2tp resumes
                  from its sharded step 3, OUT/init2tps starts FSDP (no TP) from it with --init
    OUT/pp        pipeline parallel, 2 stages, 1F1B, 4 chunks a micro-batch (tied head)
    OUT/ppgpipe   the same with GPipe, one row a chunk, untied head
    OUT/resume2pp resumes OUT/ddp's step-3 checkpoint as a 2-stage pipeline
    OUT/fsdpbf16  FSDP with bf16 autocast: bf16 gathered weights, fp32 gradient reduction
    OUT/crash     FSDP, 8 steps, in which rank 1 dies during step 5: the launch fails last

`_dist_worker.py OUT JSON pp-dp` under `torchrun --nproc_per_node 4` runs the 4-rank cases instead:

    OUT/materialize_2d.json  TP 2 x FSDP 2 materialised from the meta device against the whole model
    OUT/pp2dp2    2 pipelines of 2 stages (--pp 2 --parallel ddp), each reading 4 of 8 rows
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from llmctl.stages import pretrain


def cli_flags(cfg: dict) -> list[str]:
    """A resolved config as pretrain's command line: {"data": ["t"], "seq_len": 32} -> ["t",
    "--seq-len", "32"], leaving out defaults."""
    defaults = pretrain.PretrainConfig(data=("x",))
    flags = list(cfg["data"])
    for k, v in cfg.items():
        if k not in ("data", "parallel") and v is not None and v != getattr(defaults, k):
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def train(out: Path, cfg: dict) -> None:
    """Every run that should succeed."""
    from llmctl.cli import app

    app(
        ["--quiet", "pretrain", "-o", str(out / "ddp"), "--parallel", "ddp", *cli_flags(cfg)],
        standalone_mode=False,
    )
    for name, sharded in (("fsdp", False), ("sharded", True)):
        fsdp = pretrain.PretrainConfig(
            **{**cfg, "parallel": "fsdp", "sharded_checkpoints": sharded}
        )
        pretrain.run(out / name, fsdp)
        resumed = out / ("resume2s" if sharded else "resume2")
        if dist.get_rank() == 0:
            shutil.copytree(
                out / name / "checkpoints" / "step-0000003",
                pretrain.partial_path(resumed) / "checkpoints" / "step-0000003",
            )
        dist.barrier()
        pretrain.run(resumed, fsdp, resume=True)
    # --init from the one-file final checkpoint: read tensor by tensor into the shards.
    init = {**cfg, "parallel": "fsdp", "init": str(out / "fsdp"), "max_steps": 2}
    pretrain.run(out / "init2", pretrain.PretrainConfig(**init))


def tensor_parallel(out: Path, cfg: dict) -> None:
    """TP forward against the unsharded model, then TP training runs (every rank reads all 8 rows
    of a micro-step: one data-parallel group)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from llmctl.core.model import Transformer
    from llmctl.core.parallel import tensor_parallel as split

    tp_cfg = {**cfg, "micro_batch": cfg["micro_batch"] * 2, "tp": 2}
    mcfg = pretrain.PretrainConfig(**tp_cfg).model_config(512)
    torch.manual_seed(0)
    whole = Transformer(mcfg)
    sharded = Transformer(mcfg)
    sharded.load_state_dict(whole.state_dict())
    split(sharded, init_device_mesh("cpu", (2,)))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    diff = float((whole(ids) - sharded(ids)).abs().max())
    local = sharded.layers[0].attn.wq.weight.to_local().shape[0]
    if dist.get_rank() == 0:
        (out / "tp_forward.json").write_text(json.dumps({"max_diff": diff, "wq_rows": local}))
    pretrain.run(out / "tp", pretrain.PretrainConfig(**{**tp_cfg, "parallel": "none"}))
    tpfsdp = pretrain.PretrainConfig(**{**tp_cfg, "parallel": "fsdp", "sharded_checkpoints": True})
    pretrain.run(out / "tpfsdp", tpfsdp)
    if dist.get_rank() == 0:
        shutil.copytree(
            out / "tpfsdp" / "checkpoints" / "step-0000003",
            pretrain.partial_path(out / "resume2tp") / "checkpoints" / "step-0000003",
        )
    dist.barrier()
    pretrain.run(out / "resume2tp", tpfsdp, resume=True)
    # --init from that TP run's sharded step 3 (unfused names) into plain FSDP: another layout.
    shards = out / "tpfsdp" / "checkpoints" / "step-0000003"
    init = {**cfg, "parallel": "fsdp", "init": str(shards), "max_steps": 2}
    os.environ["LLMCTL_TRUST_SHARDS"] = "1"  # DCP's metadata is a pickle: trusted explicitly
    try:
        pretrain.run(out / "init2tps", pretrain.PretrainConfig(**init))
    finally:
        del os.environ["LLMCTL_TRUST_SHARDS"]


def pipeline_parallel(out: Path, cfg: dict) -> None:
    """Two pipeline stages: both read all 8 rows of a micro-step (no data parallelism)."""
    pp = {**cfg, "micro_batch": cfg["micro_batch"] * 2, "pp": 2}
    pretrain.run(out / "pp", pretrain.PretrainConfig(**{**pp, "pp_chunks": 4}))
    gpipe = {**pp, "pp_schedule": "gpipe", "tie_embeddings": False}
    pretrain.run(out / "ppgpipe", pretrain.PretrainConfig(**gpipe))
    if dist.get_rank() == 0:
        shutil.copytree(
            out / "ddp" / "checkpoints" / "step-0000003",
            pretrain.partial_path(out / "resume2pp") / "checkpoints" / "step-0000003",
        )
    dist.barrier()
    pretrain.run(out / "resume2pp", pretrain.PretrainConfig(**pp), resume=True)


def mixed_precision(out: Path, cfg: dict) -> None:
    """FSDP under bf16: a block computes with bf16 weights (gathered by the MixedPrecisionPolicy)
    while the sharded master weights and their gradients stay fp32."""
    import torch

    from llmctl.core.model import Transformer
    from llmctl.core.parallel import wrap
    from llmctl.core.runtime import Runtime

    bf16 = {**cfg, "parallel": "fsdp", "precision": "bf16"}
    pretrain.run(out / "fsdpbf16", pretrain.PretrainConfig(**bf16))
    model = Transformer(pretrain.PretrainConfig(**bf16).model_config(512))
    wrap(model, "fsdp", Runtime.detect("cpu", "bf16"))
    seen = {}
    w2 = model.layers[0].mlp.w2

    def note(m, _args) -> None:  # noqa: ANN001 - a hook that returns nothing leaves the input alone
        seen.setdefault("compute", str(m.weight.dtype))

    w2.register_forward_pre_hook(note)
    ids = torch.randint(0, 512, (2, 16))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    seen["master"] = str(w2.weight.dtype)
    seen["grad"] = str(w2.weight.grad.dtype)
    if dist.get_rank() == 0:
        (out / "mp_policy.json").write_text(json.dumps(seen))


def crash(out: Path, cfg: dict) -> None:
    """A run that loses rank 1 (os._exit, as a killed process would) during step 5 of 8."""
    cfg = {**cfg, "max_steps": 8, "parallel": "fsdp"}
    calls = 0
    per_step = cfg["batch_tokens"] // (cfg["micro_batch"] * cfg["seq_len"] * dist.get_world_size())

    def dying_loss(model, batch):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        if dist.get_rank() == 1 and calls > 4 * per_step:  # in step 5
            os._exit(7)
        return model(batch[0], targets=batch[1])

    pretrain.lm_loss = dying_loss  # the loop looks it up at each run
    pretrain.run(out / "crash", pretrain.PretrainConfig(**cfg))


def pipelines_in_parallel(out: Path, cfg: dict) -> None:
    """--pp 2 x 2 data-parallel pipelines: each rank of a pipeline takes 4 rows a micro-step."""
    over = {"micro_batch": cfg["micro_batch"], "pp": 2, "parallel": "ddp", "pp_chunks": 2}
    pretrain.run(out / "pp2dp2", pretrain.PretrainConfig(**{**cfg, **over}))


def materialize_2d(out: Path) -> None:
    """TP 2 x FSDP 2 (4 ranks) built on the meta device and materialised from a seed: every
    shard, gathered back, equals the whole model's initial weights. Odd sizes (vocabulary 1001,
    d_model 36) make FSDP's row chunks uneven."""
    import torch

    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.parallel import _split_state, build_on_meta, materialize, wrap
    from llmctl.core.runtime import Runtime

    mcfg = ModelConfig(
        vocab_size=1001, d_model=36, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=98, max_seq_len=32
    )
    whole = Transformer(mcfg)
    whole.init_weights(torch.Generator().manual_seed(5))
    model = build_on_meta(mcfg)
    wrap(model, "fsdp", Runtime.detect("cpu", "fp32"), tp=2)
    materialize(model, torch.device("cpu"), seed=5)
    want = _split_state(whole.state_dict(), model)
    diffs = {}
    for name, p in model.named_parameters():
        diffs[name] = float((p.full_tensor() - want[name]).abs().max())
    if dist.get_rank() == 0:
        (out / "materialize_2d.json").write_text(json.dumps(diffs))


if __name__ == "__main__":
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    cfg["data"] = tuple(cfg["data"])
    dist.init_process_group("gloo")
    if sys.argv[3:] == ["pp-dp"]:
        materialize_2d(out)
        pipelines_in_parallel(out, cfg)
        dist.destroy_process_group()
        sys.exit(0)
    train(out, cfg)
    tensor_parallel(out, cfg)
    pipeline_parallel(out, cfg)
    mixed_precision(out, cfg)
    crash(out, cfg)
    dist.destroy_process_group()
