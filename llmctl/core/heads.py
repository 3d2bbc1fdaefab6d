"""Scalar heads on the decoder: the reward model that `rm` trains and `ppo` scores rollouts with.

A reward model is the decoder's final normed hidden state at the *last real token* of a sequence
(prompt + answer, ending with the answer's <|end|>) mapped to one number by a linear head, as in
InstructGPT (Ouyang et al., 2022) and TRL's AutoModelForSequenceClassification. Rows are right-padded,
so causal attention already keeps padding out of every real position; the head just reads position
`length - 1` of each row.

On disk a reward model is an ordinary checkpoint (core/checkpoint.py: the backbone with its LM head,
config.json, tokenizer.model, manifest), so `generate` and `load_checkpoint` still open it as a plain
LM, plus `head.safetensors` (`weight` (1, d_model), `bias` (1,)) and, in config.json,
`"head": {"kind": "reward", "file": "head.safetensors"}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.core.artifacts import Manifest
from llmctl.core.checkpoint import (
    CONFIG,
    check_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
    write_checkpoint_files,
)
from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import Tokenizer

HEAD_FILE = "head.safetensors"
REWARD_HEAD = {"kind": "reward", "file": HEAD_FILE}


class ScalarHead(nn.Module):
    """Linear(d_model, 1) with a bias. Initialised small (std 1/(d_model+1), as OpenRLHF does) so the
    first rewards are near 0 and the pairwise loss starts near log 2 instead of saturating."""

    def __init__(self, d_model: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1, bias=True)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 1.0 / (d_model + 1), generator=generator)
            self.proj.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d_model) -> (...) scalars, in fp32."""
        return self.proj(h.float()).squeeze(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head as stored in head.safetensors."""
        return {
            "weight": self.proj.weight.detach().contiguous().cpu(),
            "bias": self.proj.bias.detach().contiguous().cpu(),
        }


class RewardModel(nn.Module):
    """A decoder plus a scalar head read at each row's last real token."""

    def __init__(self, backbone: Transformer, head: ScalarHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else ScalarHead(backbone.cfg.d_model)
        self.head.to(backbone.embed.weight.device)
        # The reward reads hidden states, never the LM head: an untied one is frozen (it would get
        # no gradient anyway, and DDP would wait for one). A tied one is the embedding, which trains.
        if not backbone.cfg.tie_embeddings:
            backbone.lm_head.requires_grad_(False)

    @property
    def cfg(self) -> ModelConfig:
        """The backbone's architecture."""
        return self.backbone.cfg

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks: `parallel.wrap` shards each under FSDP, then this module (the
        embedding, final norm and head) as the root."""
        return self.backbone.layers

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards of right-padded rows.

        Args:
            ids: (B, T) token ids, real tokens first, then padding.
            lengths: (B,) real token counts (>= 1).

        Returns:
            (B,) fp32 rewards.
        """
        h = self.backbone(ids, hidden=True)  # (B, T, d_model)
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # (B, d_model)
        return self.head(last)

    @torch.no_grad()
    def score(
        self, seqs: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 32
    ) -> torch.Tensor:
        """Rewards of token sequences (prompt + answer ids each), in batches, without gradients.

        Returns:
            (len(seqs),) fp32 rewards on the CPU.
        """
        out = []
        device = self.backbone.embed.weight.device
        for i in range(0, len(seqs), batch_size):
            ids, lengths = pad_right(seqs[i : i + batch_size], pad_id)
            out.append(self(ids.to(device), lengths.to(device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (B, T_max) and their lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids, lengths


def write_head(directory: Path, head: dict[str, torch.Tensor]) -> None:
    """Write head.safetensors (`ScalarHead.tensors()`) into a checkpoint directory being built."""
    save_file(head, str(Path(directory) / HEAD_FILE), metadata={"kind": "reward"})


def split_state(
    rm: RewardModel, weights: dict[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """(backbone weights, head tensors) of a reward model's whole state dict (`rm.state_dict()`
    keys, e.g. gathered from FSDP shards); (None, the head's own tensors) without one."""
    if weights is None:
        return None, rm.head.tensors()
    backbone = {k[len("backbone.") :]: v for k, v in weights.items() if k.startswith("backbone.")}
    if rm.cfg.tie_embeddings:
        backbone.pop("lm_head.weight", None)  # stored once, as embed.weight
    head = {k: weights[f"head.proj.{k}"].detach().contiguous().cpu() for k in ("weight", "bias")}
    return backbone, head


def save_reward_model(
    path: Path,
    rm: RewardModel,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    manifest: Manifest | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a reward-model checkpoint atomically (the backbone checkpoint plus head.safetensors).

    `weights`: the whole model's state dict to store instead of `rm`'s own (one gathered from
    FSDP shards, say); `optimizer` may be a state dict too.

    Returns:
        `path`.
    """
    backbone, head = split_state(rm, weights)
    return save_checkpoint(
        path,
        rm.backbone,
        tokenizer,
        optimizer=optimizer,
        trainer_state=trainer_state,
        manifest=manifest,
        extra_config={"head": REWARD_HEAD},
        weights=backbone,
        extra_files=lambda d: write_head(d, head),
    )


def write_reward_model_files(
    directory: Path,
    rm: RewardModel,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a reward model's files (no manifest) into a directory being committed (arguments as
    in `save_reward_model`)."""
    backbone, head = split_state(rm, weights)
    write_checkpoint_files(
        directory,
        rm.backbone,
        tokenizer,
        optimizer=optimizer,
        trainer_state=trainer_state,
        extra_config={"head": REWARD_HEAD},
        weights=backbone,
    )
    write_head(directory, head)


def load_reward_model(
    path: Path, device: torch.device | str = "cpu", tokenizer: Tokenizer | None = None
) -> tuple[RewardModel, Tokenizer]:
    """Load a reward model (fp32, eval mode) and its tokenizer.

    Args:
        path: Reward-model checkpoint directory.
        device: Where to put the weights.
        tokenizer: The tokenizer of the model whose outputs will be scored (the PPO policy); the
            reward model must have been trained with the same one.

    Raises:
        InputError: Not a reward model, a corrupt head, or a tokenizer mismatch.
    """
    path = Path(path)
    cfg = check_checkpoint_dir(path)
    head_cfg = cfg.get("head") or {}
    head_file = path / (head_cfg.get("file") or HEAD_FILE)
    if head_cfg.get("kind") != "reward" or not head_file.is_file():
        raise InputError(
            f"{path} is not a reward model (no {HEAD_FILE})",
            f"train one with llmctl rm PREFS --init {path} -o RM",
        )
    expected = cfg.get("tokenizer", {}).get("fingerprint")
    if tokenizer is not None and expected and tokenizer.fingerprint != expected:
        raise InputError(
            f"reward model {path} uses tokenizer {expected}, the policy uses {tokenizer.fingerprint}",
            "train the reward model from the policy's SFT checkpoint: llmctl rm PREFS --init SFT -o RM",
        )
    ck = load_checkpoint(path, device=device)
    head = ScalarHead(ck.model.cfg.d_model)
    head.proj.load_state_dict(read_head(path, ck.model.cfg.d_model))
    return RewardModel(ck.model, head).to(device).eval(), ck.tokenizer


def read_head(path: Path, d_model: int) -> dict[str, torch.Tensor]:
    """A reward model's head tensors, {"weight": (1, d_model), "bias": (1,)}, checked.

    Raises:
        InputError: The head file is corrupt or does not fit a d_model-wide backbone.
    """
    head_file = Path(path) / (
        (check_checkpoint_dir(Path(path)).get("head") or {}).get("file") or HEAD_FILE
    )
    try:
        t = load_file(str(head_file), device="cpu")
        t = {"weight": t["weight"], "bias": t["bias"]}
        if tuple(t["weight"].shape) != (1, d_model) or tuple(t["bias"].shape) != (1,):
            raise RuntimeError(
                f"weight {tuple(t['weight'].shape)}, bias {tuple(t['bias'].shape)} for d_model {d_model}"
            )
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{head_file} is corrupt or does not fit the model ({type(e).__name__}: {str(e)[:200]})",
            "re-train or re-copy the reward model",
        ) from None
    return t


def is_reward_model(path: Path) -> bool:
    """True if `path` holds a reward-model checkpoint (by its config.json and head file)."""
    try:
        cfg = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (cfg.get("head") or {}).get("kind") == "reward" and (Path(path) / HEAD_FILE).is_file()
