"""Run by test_distributed.py under `torchrun --nproc_per_node 2`, not collected by pytest.

Each torchrun launch costs 10-20 s of start-up on 2 cores, so one launch runs several pretrain runs
in one process group (`pretrain.run` leaves a group it did not create alone):

    train OUT JSON   DDP through the CLI (OUT/ddp), FSDP (OUT/fsdp), then an FSDP resume from
                     OUT/fsdp's step-3 checkpoint (OUT/resume2)
    crash OUT JSON   FSDP run (OUT/crash) in which rank 1 dies during step 5
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
    from llmctl.cli import app

    app(
        ["--quiet", "pretrain", "-o", str(out / "ddp"), "--parallel", "ddp", *cli_flags(cfg)],
        standalone_mode=False,
    )
    fsdp = pretrain.PretrainConfig(**{**cfg, "parallel": "fsdp"})
    pretrain.run(out / "fsdp", fsdp)
    if dist.get_rank() == 0:
        shutil.copytree(
            out / "fsdp" / "checkpoints" / "step-0000003",
            pretrain.partial_path(out / "resume2") / "checkpoints" / "step-0000003",
        )
    dist.barrier()
    pretrain.run(out / "resume2", fsdp, resume=True)


def crash(out: Path, cfg: dict) -> None:
    calls = 0
    per_step = cfg["batch_tokens"] // (cfg["micro_batch"] * cfg["seq_len"] * dist.get_world_size())

    def dying_loss(model, batch):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += 1
        if dist.get_rank() == 1 and calls > 4 * per_step:  # in step 5
            os._exit(7)
        return model(batch[0], targets=batch[1])

    pretrain.lm_loss = dying_loss  # the loop looks it up at each run
    pretrain.run(out / "crash", pretrain.PretrainConfig(**{**cfg, "parallel": "fsdp"}))


if __name__ == "__main__":
    scenario, out, cfg = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    cfg["data"] = tuple(cfg["data"])
    dist.init_process_group("gloo")
    {"train": train, "crash": crash}[scenario](out, cfg)
    dist.destroy_process_group()
