"""rm: checkpoint + preference pairs -> reward model; `rm score`: reward model + data -> scored docs.

Training (InstructGPT, Ouyang et al., 2022): a scalar head (core/heads.py) on the `--init` model
reads the final hidden state at the last token of prompt + answer; the loss is the Bradley-Terry
negative log-likelihood -log sigmoid(r_chosen - r_rejected), averaged over pairs. Chosen and
rejected answers go through the model in one batch of right-padded rows. Held-out pairs
(`--val-fraction`, split by prompt, seeded) give `val_accuracy` (share of pairs ranked right) and
`val_margin` (mean r_chosen - r_rejected), before training (`*_init`) and every `--eval-every`
steps. Departure from InstructGPT: each pair is its own example (they batch all K-choose-2
comparisons of one prompt together); the whole backbone is trained, at a low learning rate.
The loop, schedule, checkpoints, resume and metrics are shared with dpo (core/pairs.py), and so
is `--parallel ddp|fsdp` under torchrun (FSDP shards the backbone's blocks, then the whole reward
model, head included, as the root).

Output: a checkpoint directory that loads as a reward model (`load_reward_model`, used by ppo) and,
since it keeps the LM head, as a plain LM (`generate`).

Scoring writes the input rows plus `score` (conversations: `messages`, or `prompt` + `response`)
or `score_chosen` and `score_rejected` (preference pairs) as a docs dataset (Parquet).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.chatdata import (
    encode_preferences,
    load_conversations,
    load_preferences,
    read_rows,
)
from llmctl.core.checkpoint import (
    check_checkpoint,
    checkpoint_errors,
    iter_checkpoint_weights,
    load_checkpoint,
)
from llmctl.core.config import require, to_dict
from llmctl.core.data_parallel import plan_ranks
from llmctl.core.heads import (
    RewardModel,
    ScalarHead,
    is_reward_model,
    load_reward_model,
    read_head,
    save_reward_model,
    write_reward_model_files,
)
from llmctl.core.pairs import PairBatch, PairStage, PairTrainConfig, load_pair_data, train_pairs
from llmctl.core.parallel import build_on_meta, fill_parameters, materialize
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class RMConfig(PairTrainConfig):
    """Settings of `llmctl rm` (the shared pair-training knobs; see core/pairs.PairTrainConfig)."""

    lr: float = 1e-4  # peak learning rate (head and backbone)


def run(
    dst: Path,
    cfg: RMConfig,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
    runtime: Runtime | None = None,
) -> Manifest:
    """Train a reward model on preference pairs; write it to `dst`.

    Raises:
        InputError: Bad pairs or checkpoint (nothing is written). ConfigError: inconsistent
            settings. TrainingError: the loss became non-finite (checkpoints stay in `<dst>.partial`).
    """
    dst = Path(dst)
    if not resume:
        check_output(dst, force)
    rt = runtime or Runtime.detect(cfg.device, cfg.precision)
    # Several processes without a mode, or a batch they do not divide: refused before loading.
    mode, _ = plan_ranks(cfg.parallel, cfg.batch_size, cfg.micro_batch, rt, "pairs")
    init = Path(cfg.init)
    torch.manual_seed(cfg.seed)
    # A new head's initial values come from the seed alone, so every layout starts the same.
    new_head = torch.Generator().manual_seed(cfg.seed)
    fill = None
    if mode == "fsdp":  # built on the meta device: each rank allocates only its shards
        rm, tok, fill = _on_meta(init, new_head, rt)
    elif is_reward_model(init):  # continue training a reward model, head included
        rm, tok = load_reward_model(init, device=rt.device)
    else:
        ck = load_checkpoint(init, device=rt.device)
        head = ScalarHead(ck.model.cfg.d_model, generator=new_head)
        rm, tok = RewardModel(ck.model, head.to(rt.device)), ck.tokenizer
    data = load_pair_data(cfg, tok, rm.backbone.cfg.max_seq_len)

    def load_weights(path: Path) -> None:
        rm.load_state_dict(load_reward_model(path, device=rt.device, tokenizer=tok)[0].state_dict())

    stage = PairStage(
        name="rm",
        model=rm,
        tokenizer=tok,
        rewards=rewards,
        save=lambda p, m, st: save_reward_model(p, rm, tok, manifest=m, **st),
        write_files=lambda d, st: write_reward_model_files(d, rm, tok, **st),
        load_weights=load_weights,
        inputs=[input_record(cfg.init, "checkpoint")],
        materialize=fill,
    )
    return train_pairs(dst, cfg, data, stage, rt, force=force, resume=resume, progress=progress)


def _on_meta(
    init: Path, new_head: torch.Generator, rt: Runtime
) -> tuple[RewardModel, Tokenizer, Callable[[Path | None], None]]:
    """The reward model on the meta device, its tokenizer, and what fills it once FSDP has
    wrapped it: the backbone one tensor at a time from `init` (or the checkpoint resumed), the
    head from that reward model's head file, or else new from `new_head`."""
    _, mcfg, tok = check_checkpoint(init)
    if is_reward_model(init):
        head_values = read_head(init, mcfg.d_model)
    else:
        head_values = ScalarHead(mcfg.d_model, generator=new_head).tensors()
    with torch.device("meta"):
        rm = RewardModel(build_on_meta(mcfg), ScalarHead(mcfg.d_model))

    def fill(resumed: Path | None) -> None:
        source = resumed or init
        if resumed is not None:
            check_checkpoint(resumed, tok)
        rm.to_empty(device=rt.device)  # on the FSDP root, which tracks the new storage
        with checkpoint_errors(source):
            materialize(
                rm.backbone, rt.device, state=iter_checkpoint_weights(source), allocate=False
            )
        values = read_head(resumed, mcfg.d_model) if resumed is not None else head_values
        fill_parameters(rm.head, {f"proj.{k}": v for k, v in values.items()})

    return rm, tok, fill


def rewards(model: torch.nn.Module, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of the chosen and the rejected rows, (B,) each."""
    r = model(b.ids, b.lengths)
    return r[: b.n_pairs], r[b.n_pairs :]


# -- scoring ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RMScoreConfig:
    """Settings of `llmctl rm score`."""

    batch_size: int = 32  # sequences per forward pass
    max_len: int | None = None  # tokens per sequence (default: the model's context)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # fp32 keeps scores comparable across runs

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(
            self.max_len is None or self.max_len >= 2, f"--max-len must be >= 2, got {self.max_len}"
        )


def score(
    checkpoint: Path,
    data: str | Path,
    dst: Path,
    cfg: RMScoreConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Score conversations or preference pairs with a reward model; write rows + scores to `dst`.

    Raises:
        InputError: Not a reward model, or malformed data (nothing is written).
    """
    dst = Path(dst)
    check_output(dst, force)
    rt = Runtime.detect(cfg.device, cfg.precision)
    rm, tok = load_reward_model(Path(checkpoint), device=rt.device)
    max_len = min(cfg.max_len or rm.backbone.cfg.max_seq_len, rm.backbone.cfg.max_seq_len)
    rows_it, src = read_rows(data)
    rows = [r for _, r in rows_it]
    pairs = "chosen" in rows[0] and "rejected" in rows[0]
    truncated = 0
    if pairs:
        prefs, _ = load_preferences(data)
        enc, truncated = encode_preferences(tok, prefs, max_len)
        seqs = [p.prompt + p.chosen for p in enc] + [p.prompt + p.rejected for p in enc]
    else:
        seqs = []
        for c in load_conversations(data)[0]:
            ids, _ = tok.render_chat(c.messages)
            truncated += len(ids) > max_len
            seqs.append(ids[:max_len])
    progress.start("score", len(seqs), "seqs")
    scores = []
    with rt.autocast():
        for i in range(0, len(seqs), cfg.batch_size):
            part = seqs[i : i + cfg.batch_size]
            scores.append(rm.score(part, pad_id=tok.pad_id, batch_size=cfg.batch_size))
            progress.advance(len(part))
    progress.stop()
    s = torch.cat(scores)
    stats: dict[str, Any]
    if pairs:
        n = len(rows)
        sc, sr = s[:n], s[n:]
        for r, a, b in zip(rows, sc.tolist(), sr.tolist(), strict=True):
            r["score_chosen"], r["score_rejected"] = a, b
        stats = {
            "accuracy": round(float((sc > sr).float().mean()), 5),
            "margin": round(float((sc - sr).mean()), 5),
            "mean_score_chosen": round(float(sc.mean()), 5),
            "mean_score_rejected": round(float(sr.mean()), 5),
        }
    else:
        for r, a in zip(rows, s.tolist(), strict=True):
            r["score"] = a
        stats = {
            "mean_score": round(float(s.mean()), 5),
            "std_score": round(float(s.std()), 5) if len(s) > 1 else 0.0,
        }
    with commit_output(
        dst,
        kind="docs",
        stage="rm-score",
        config={**to_dict(cfg), "checkpoint": str(checkpoint)},
        inputs=[src.record(), input_record(checkpoint, "checkpoint")],
        force=force,
    ) as out:
        pq.write_table(_table(rows), out.path / "part-00000.parquet", compression="zstd")
        out.manifest.counts = {"rows": len(rows), "sequences": len(seqs), "truncated": truncated}
        out.manifest.stats = {"format": "pairs" if pairs else "conversations", **stats}
        out.manifest.tokenizer = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}
    return out.manifest


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table. JSONL rows may mix a string here with a message list there; such
    columns are stored as JSON strings, which the post-training readers parse back."""
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        fixed = [
            {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
            for r in rows
        ]
        return pa.Table.from_pylist(fixed)
