"""dpo: checkpoint + preference pairs -> aligned checkpoint, by Direct Preference Optimisation.

DPO (Rafailov et al., 2023) trains the policy directly on pairs, without a reward model or
sampling: with the implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) the loss is the
Bradley-Terry one, -log sigmoid(r(x, y_chosen) - r(x, y_rejected)). log pi(y|x) is the sum of the
answer's token log-probabilities (assistant content and its <|end|>, the PairExample masks), read
from the final hidden states through core/losses.token_logprobs (chunked, no full logits) where
that module is present, else through log_softmax + gather.

The reference pi_ref is the `--init` checkpoint (or `--ref`). Its log-probabilities never change, so
they are computed once for every pair before training, in eval mode and without gradients, and the
reference model is freed: training holds one model, and the reference cannot drift. Reported
(train, and held-out before and during training): implicit-reward accuracy, mean margin, mean
chosen and rejected rewards. At step 0 the policy equals the reference, so every margin is 0 and
the loss is log 2. The loop, schedule, checkpoints, resume and metrics are shared with rm
(core/pairs.py). Output: a plain LM checkpoint (`generate`, `eval`, `ppo --init`).

Several processes (`--parallel ddp|fsdp` under torchrun): every rank computes the reference
log-probs of all pairs itself (once, before the policy is wrapped: no communication, and the same
numbers everywhere), then trains on its share of each micro-step's pairs. The policy is trained
through `AnswerLogprobs`, a module whose forward returns the answers' log-probs, so DDP and FSDP
see the LM head used inside a forward (FSDP gathers it for the whole call).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.core.artifacts import Manifest, check_output, input_record
from llmctl.core.chatdata import IGNORE
from llmctl.core.checkpoint import (
    check_checkpoint,
    checkpoint_errors,
    iter_checkpoint_weights,
    load_checkpoint,
    save_checkpoint,
    write_checkpoint_files,
)
from llmctl.core.config import require
from llmctl.core.data_parallel import plan_ranks
from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.pairs import (
    PairBatch,
    PairData,
    PairStage,
    PairTrainConfig,
    chunks,
    load_pair_data,
    train_pairs,
)
from llmctl.core.parallel import build_on_meta, materialize, reshard, wrap
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime

try:  # the chunked LM head (no (rows, vocab) logits); plain log_softmax + gather without it
    from llmctl.core.losses import token_logprobs
except ImportError:  # pragma: no cover - depends on the checkout
    token_logprobs = None


@dataclass(frozen=True, kw_only=True)
class DPOConfig(PairTrainConfig):
    """Settings of `llmctl dpo` (plus the shared pair-training knobs of core/pairs.PairTrainConfig)."""

    ref: str | None = None  # reference checkpoint (default: --init)
    beta: float = 0.1  # strength of the implicit KL leash to the reference
    lr: float = 1e-5  # peak learning rate (DPO wants a low one)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, f"--beta must be > 0, got {self.beta}")


def run(
    dst: Path,
    cfg: DPOConfig,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
    runtime: Runtime | None = None,
) -> Manifest:
    """Train a policy with DPO on preference pairs; write the checkpoint to `dst`.

    Raises:
        InputError: Bad pairs or checkpoints, or a reference with another tokenizer (nothing is
            written). ConfigError: inconsistent settings. TrainingError: non-finite loss.
    """
    dst = Path(dst)
    if not resume:
        check_output(dst, force)
    rt = runtime or Runtime.detect(cfg.device, cfg.precision)
    # Several processes without a mode, or a batch they do not divide: refused before loading.
    mode, _ = plan_ranks(cfg.parallel, cfg.batch_size, cfg.micro_batch, rt, "pairs")
    init, ref_path = Path(cfg.init), Path(cfg.ref or cfg.init)
    meta = mode == "fsdp"  # built on the meta device: each rank allocates only its shards
    if meta:
        _, mcfg, tok = check_checkpoint(init)
        policy = build_on_meta(mcfg)
    else:
        ck = load_checkpoint(init, device=rt.device)
        policy, tok = ck.model, ck.tokenizer
    data = load_pair_data(cfg, tok, policy.cfg.max_seq_len)
    if cfg.ref:
        _, ref_cfg, ref_tok = check_checkpoint(ref_path)
        if ref_tok.fingerprint != tok.fingerprint:
            raise InputError(
                f"reference {ref_path} uses tokenizer {ref_tok.fingerprint}, {cfg.init} uses {tok.fingerprint}",
                "use a reference trained with the policy's tokenizer (its SFT checkpoint)",
            )
    answer = AnswerLogprobs(policy)
    if rt.is_main:
        progress.log("reference log-probs: one pass over the pairs")
    if not meta:
        ref = load_checkpoint(ref_path, device=rt.device).model if cfg.ref else policy
        _add_reference(data, AnswerLogprobs(ref), tok.pad_id, cfg.micro_batch, rt)
        del ref

    def fill(resumed: Path | None) -> None:
        """Under FSDP, once `answer` is wrapped: the policy's shards from --init, the reference
        pass (through the policy, or a sharded copy of --ref), then a resumed checkpoint's."""
        answer.to_empty(device=rt.device)  # on the FSDP root, which tracks the new storage
        with checkpoint_errors(init):
            materialize(policy, rt.device, state=iter_checkpoint_weights(init), allocate=False)
        if cfg.ref:
            ref = AnswerLogprobs(build_on_meta(ref_cfg))
            wrap(ref, "fsdp", rt)
            ref.to_empty(device=rt.device)
            with checkpoint_errors(ref_path):
                materialize(
                    ref.policy, rt.device, state=iter_checkpoint_weights(ref_path), allocate=False
                )
            _add_reference(data, ref, tok.pad_id, cfg.micro_batch, rt)
            del ref
        else:
            _add_reference(data, answer, tok.pad_id, cfg.micro_batch, rt)
        if resumed is not None:
            check_checkpoint(resumed, tok)
            with checkpoint_errors(resumed):
                materialize(
                    policy, rt.device, state=iter_checkpoint_weights(resumed), allocate=False
                )

    def rewards(model: nn.Module, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        assert b.ref is not None
        r = cfg.beta * (model(b.ids, b.targets) - b.ref)  # model: AnswerLogprobs, maybe wrapped
        return r[: b.n_pairs], r[b.n_pairs :]

    def files(st: dict[str, Any]) -> dict[str, Any]:
        """save_checkpoint's arguments from the trained module's state: the policy's weights."""
        weights = {k[len("policy.") :]: v for k, v in st["weights"].items()}
        if policy.cfg.tie_embeddings:
            weights.pop("lm_head.weight", None)  # stored once, as embed.weight
        return {**st, "weights": weights}

    def load_weights(path: Path) -> None:
        policy.load_state_dict(
            load_checkpoint(path, device=rt.device, tokenizer=tok).model.state_dict()
        )

    inputs = [input_record(cfg.init, "checkpoint")]
    if cfg.ref:
        inputs.append(input_record(cfg.ref, "checkpoint"))
    stage = PairStage(
        name="dpo",
        model=answer,
        tokenizer=tok,
        rewards=rewards,
        save=lambda p, m, st: save_checkpoint(p, policy, tok, manifest=m, **files(st)),
        write_files=lambda d, st: write_checkpoint_files(d, policy, tok, **files(st)),
        load_weights=load_weights,
        inputs=inputs,
        materialize=fill if meta else None,
    )
    return train_pairs(dst, cfg, data, stage, rt, force=force, resume=resume, progress=progress)


class AnswerLogprobs(nn.Module):
    """The policy as DPO trains it: (ids, targets) -> each row's summed answer log-probs. One
    forward reads the decoder and its LM head, which DDP and FSDP need to see (core/data_parallel)."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy

    @property
    def cfg(self) -> ModelConfig:
        """The policy's architecture."""
        return self.policy.cfg

    @property
    def layers(self) -> nn.ModuleList:
        """The policy's blocks: `parallel.wrap` shards each under FSDP, then this module as the
        root, so the LM head stays gathered for the whole forward."""
        return self.policy.layers

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(2B, T) ids and next-token targets (IGNORE off the answer) -> (2B,) fp32 sums."""
        hidden = self.policy(ids, hidden=True)  # (2B, T, d_model)
        if token_logprobs is not None:
            return token_logprobs(hidden, self.policy.lm_head.weight, targets).sum(-1)
        logp = torch.log_softmax(self.policy.lm_head(hidden).float(), dim=-1)  # (2B, T, vocab)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return torch.where(targets != IGNORE, picked, 0.0).sum(-1)


def sequence_logprobs(model: Transformer, b: PairBatch) -> torch.Tensor:
    """Sum of the answer tokens' log-probabilities per row, (2B,) fp32."""
    return AnswerLogprobs(model)(b.ids, b.targets)


@torch.no_grad()
def _add_reference(
    data: PairData, ref: AnswerLogprobs, pad_id: int, size: int, rt: Runtime
) -> None:
    """Fill data.train_ref / data.val_ref: (n, 2) reference log-probs of (chosen, rejected).
    Under FSDP `ref` is the wrapped root and every rank runs every batch (same data)."""
    was = ref.training
    ref.eval()

    def of(pairs: list) -> torch.Tensor:
        out = []
        with rt.autocast():
            for b in chunks(pairs, size, pad_id):
                b = b.to(rt.device)
                lp = ref(b.ids, b.targets).float().cpu()
                out.append(torch.stack([lp[: b.n_pairs], lp[b.n_pairs :]], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 2)

    data.train_ref, data.val_ref = of(data.train), of(data.val)
    ref.train(was)
    reshard(ref)  # an FSDP root keeps its weights gathered after a forward without backward
