"""Run by test_distributed_post.py under `torchrun --nproc_per_node 2`, not collected by pytest.

Each torchrun launch costs 10-20 s of start-up on 2 cores, so the one launch (`_dist_post_worker.py
OUT JSON`) runs every multi-process post-training case in one process group (the stages leave a
group they did not create alone):

    OUT/sft-ddp     sft, DDP, through the CLI
    OUT/sft-fsdp    sft, FSDP; OUT/sft-resume resumes from its step-2 checkpoint
    OUT/lora-ddp    sft with LoRA adapters, DDP
    OUT/rm-fsdp     rm, FSDP (the blocks, then the reward model with its head as the root)
    OUT/dpo-fsdp    dpo, FSDP
    OUT/dpo-ddp     dpo, DDP, through the CLI

JSON: {"sft": SFTConfig fields, "rm": RMConfig fields, "dpo": DPOConfig fields}, without `parallel`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from llmctl.core.artifacts import partial_path
from llmctl.stages import dpo, rm, sft


def cli(command: str, out: Path, cfg: dict, parallel: str) -> None:
    """Run `llmctl COMMAND DATA -o OUT --parallel P --key value ...` in this process."""
    from llmctl.cli import app

    flags = [cfg["data"], "-o", str(out), "--parallel", parallel]
    for k, v in cfg.items():
        if k != "data":
            flags += [f"--{k.replace('_', '-')}", str(v)]
    app(["--quiet", command, *flags], standalone_mode=False)


def resume_from(run: Path, step: int, to: Path) -> None:
    """Rank 0 copies `run`'s checkpoint of `step` to where `--resume -o to` looks for it."""
    name = f"step-{step:07d}"
    if dist.get_rank() == 0:
        shutil.copytree(run / "checkpoints" / name, partial_path(to) / "checkpoints" / name)
    dist.barrier()


def main(out: Path, cfgs: dict[str, dict]) -> None:
    cli("sft", out / "sft-ddp", cfgs["sft"], "ddp")
    fsdp = sft.SFTConfig(**cfgs["sft"], parallel="fsdp")
    sft.run(out / "sft-fsdp", fsdp)
    resume_from(out / "sft-fsdp", 2, out / "sft-resume")
    sft.run(out / "sft-resume", fsdp, resume=True)
    sft.run(out / "lora-ddp", sft.SFTConfig(**cfgs["sft"], lora_rank=4, parallel="ddp"))
    rm.run(out / "rm-fsdp", rm.RMConfig(**cfgs["rm"], parallel="fsdp"))
    dpo.run(out / "dpo-fsdp", dpo.DPOConfig(**cfgs["dpo"], parallel="fsdp"))
    cli("dpo", out / "dpo-ddp", cfgs["dpo"], "ddp")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
    dist.destroy_process_group()
