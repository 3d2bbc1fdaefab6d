"""Run by test_distributed_post.py under `torchrun --nproc_per_node 2`, not collected by pytest.

Each torchrun launch costs 10-20 s of start-up on 2 cores, so the one launch (`_dist_post_worker.py
OUT JSON`) runs every multi-process post-training case in one process group (the stages leave a
group they did not create alone):

    OUT/sft-ddp     sft, DDP, through the CLI
    OUT/sft-fsdp    sft, FSDP; OUT/sft-resume resumes from its step-2 checkpoint
    OUT/lora-ddp    sft with LoRA adapters, DDP
    OUT/rm-fsdp     rm, FSDP (the blocks, then the reward model with its head as the root), built
                    on the meta device; OUT/rm-fsdp-resume resumes from its step-2 checkpoint
    OUT/rm-ddp      rm, DDP, through the CLI
    OUT/dpo-fsdp    dpo, FSDP (meta device); OUT/dpo-fsdp-resume resumes from its step 2;
                    OUT/dpo-fsdp-ref names --ref (a sharded reference copy for the reference pass)
    OUT/dpo-ddp     dpo, DDP, through the CLI
    OUT/ppo-ddp     ppo, DDP, 2 steps, through the CLI; OUT/ppo-resume resumes from its step 1
    OUT/ppo-fsdp    ppo, FSDP, the same 2 steps; OUT/ppo-fsdp-resume resumes from its step 1;
                    OUT/ppo-fsdp-bf16 one step under bf16
    OUT/whiten.json whiten_over_ranks against whiten of both ranks' rows together

JSON: {"sft": SFTConfig fields, "rm": ..., "dpo": ..., "ppo": ...}, without `parallel`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmctl.core.artifacts import partial_path
from llmctl.core.ppo import whiten, whiten_over_ranks
from llmctl.stages import dpo, ppo, rm, sft


def cli(command: str, out: Path, cfg: dict, parallel: str, first: str = "data") -> None:
    """Run `llmctl COMMAND cfg[first] -o OUT --parallel P --key value ...` in this process."""
    from llmctl.cli import app

    flags = [cfg[first], "-o", str(out), "--parallel", parallel]
    for k, v in cfg.items():
        if k != first:
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
    resume_from(out / "rm-fsdp", 2, out / "rm-fsdp-resume")
    rm.run(out / "rm-fsdp-resume", rm.RMConfig(**cfgs["rm"], parallel="fsdp"), resume=True)
    cli("rm", out / "rm-ddp", cfgs["rm"], "ddp")
    dpo.run(out / "dpo-fsdp", dpo.DPOConfig(**cfgs["dpo"], parallel="fsdp"))
    resume_from(out / "dpo-fsdp", 2, out / "dpo-fsdp-resume")
    dpo.run(out / "dpo-fsdp-resume", dpo.DPOConfig(**cfgs["dpo"], parallel="fsdp"), resume=True)
    with_ref = {**cfgs["dpo"], "ref": cfgs["dpo"]["init"]}  # the default reference, named
    dpo.run(out / "dpo-fsdp-ref", dpo.DPOConfig(**with_ref, parallel="fsdp"))
    cli("dpo", out / "dpo-ddp", cfgs["dpo"], "ddp")
    cli("ppo", out / "ppo-ddp", cfgs["ppo"], "ddp", first="prompts")
    resume_from(out / "ppo-ddp", 1, out / "ppo-resume")
    ppo.run(out / "ppo-resume", ppo.PPOConfig(**cfgs["ppo"], parallel="ddp"), resume=True)
    sharded = ppo.PPOConfig(**cfgs["ppo"], parallel="fsdp")
    ppo.run(out / "ppo-fsdp", sharded)
    resume_from(out / "ppo-fsdp", 1, out / "ppo-fsdp-resume")
    ppo.run(out / "ppo-fsdp-resume", sharded, resume=True)
    bf16 = {**cfgs["ppo"], "steps": 1, "save_every": 0, "precision": "bf16"}
    ppo.run(out / "ppo-fsdp-bf16", ppo.PPOConfig(**bf16, parallel="fsdp"))
    check_whitening(out / "whiten.json")


def check_whitening(path: Path) -> None:
    """Rank 0 writes the largest difference between whitening each rank's rows over both ranks
    and whitening all rows in one tensor."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(2, 3, 5, generator=g), torch.rand(2, 3, 5, generator=g) > 0.3
    mine = whiten_over_ranks(x[dist.get_rank()], mask[dist.get_rank()])
    whole = whiten(x.flatten(0, 1), mask.flatten(0, 1)).view(2, 3, 5)[dist.get_rank()]
    diff = torch.tensor(float((mine - whole).abs().max()))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        path.write_text(json.dumps({"max_diff": float(diff)}))


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
    dist.destroy_process_group()
