"""pretrain: tokens -> checkpoint. Next-token training of the Llama-style decoder from scratch.

Data: one or more tokens artifacts (mixed by weight, `--data PATH=WEIGHT`), sampled as random
contiguous windows (core/batches.py): the batch at step s is a pure function of (seed, s).
Optimisation: AdamW (decay on matrices only, core/optim.py), linear warmup then cosine decay to
`min_lr`, gradient accumulation up to `batch_tokens` per step, gradient clipping, bf16 autocast where
the hardware has it. Run directory while training: `<out>.partial/` with `checkpoints/step-N/` every
`save_every` steps and `metrics.jsonl`; at the end the final checkpoint, `loss.png` and the manifest
are written and the directory is renamed to `<out>`. `--resume` continues from the newest checkpoint
in `<out>.partial/` and reproduces the uninterrupted run's losses exactly.

Several processes (`torchrun --nproc_per_node N -m llmctl pretrain ... --parallel ddp|fsdp`): each
data-parallel rank trains on its own rows of every step's batch (`--micro-batch` is per rank;
`--batch-tokens` is global), the model is wrapped by `core/parallel.py` (DDP, FSDP, and `--tp T`
tensor parallelism inside groups of T ranks, which share their rows) or split into pipeline stages
by `core/pipeline.py` (`--pp P`), and rank 0 alone writes metrics, checkpoints and the manifest.
Intermediate checkpoints are the one-file format, gathered from shards and stages, unless
`--sharded-checkpoints`; a run resumes on another number of ranks, another TP or PP degree and
another micro-batch (a step's rows do not depend on how they are split). `--micro-batch auto`
takes the largest micro-batch whose estimated memory fits the device (core/sizing.py).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from llmctl.core import sizing
from llmctl.core.artifacts import (
    Manifest,
    input_record,
    is_artifact,
    partial_path,
)
from llmctl.core.batches import Source, WindowSampler, val_windows
from llmctl.core.checkpoint import (
    SHARDS,
    WEIGHTS,
    check_checkpoint,
    check_checkpoint_dir,
    checkpoint_errors,
    iter_checkpoint_weights,
    iter_weights,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    read_optimizer_state,
    save_checkpoint,
    write_checkpoint_files,
)
from llmctl.core.config import require, to_dict
from llmctl.core.data_parallel import on_ranks, run_output
from llmctl.core.distributed import barrier
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.model import (
    ModelConfig,
    Transformer,
    chinchilla_tokens,
    flops_per_token,
    param_count,
    preset,
)
from llmctl.core.optim import make_adamw
from llmctl.core.parallel import (
    build_on_meta,
    clip_grad_norm,
    data_parallel,
    data_rank,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    load_sharded_model,
    load_sharded_optimizer,
    materialize,
    save_sharded,
    wrap,
)
from llmctl.core.pipeline import Pipeline
from llmctl.core.plots import plot_metrics
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.tokenizer import Tokenizer
from llmctl.core.tokens import IndexedDataset
from llmctl.core.train_loop import Schedule, read_metrics, train

# Fields that change the trajectory: a resumed run must agree on these to reproduce the losses.
TRAJECTORY = (
    "data",
    "init",
    "model",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "rope_theta",
    "tie_embeddings",
    "seq_len",
    "batch_tokens",
    "micro_batch",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "seed",
    "precision",
)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Settings of `llmctl pretrain`."""

    data: tuple[str, ...] = ()  # tokens artifacts, each "PATH" or "PATH=WEIGHT"
    init: str | None = (
        None  # start from this checkpoint's weights (continued pretraining); its shape wins
    )
    model: str = "tiny"  # preset: tiny, 124m, 350m, 1b, 7b
    d_model: int | None = None  # override the preset's width
    n_layers: int | None = None  # override the preset's depth
    n_heads: int | None = None  # override the preset's query heads
    n_kv_heads: int | None = None  # override the preset's key/value heads
    d_ff: int | None = None  # override the preset's MLP width
    rope_theta: float | None = None  # override the preset's RoPE base
    tie_embeddings: bool | None = None  # override the preset's head tying
    seq_len: int = 256  # training context (tokens per row)
    batch_tokens: int = 16384  # tokens per optimizer step, all ranks and micro-steps together
    micro_batch: int | str = 16  # rows per forward pass on each rank, or "auto" (largest that fits)
    max_steps: int | None = None  # optimizer steps; overrides `tokens`
    tokens: str = "auto"  # tokens to train on: a number (1e9, 2_000_000) or "auto" (Chinchilla, 20 per parameter)
    lr: float = 3e-3  # peak learning rate
    min_lr: float | None = None  # floor of the cosine decay (default lr / 10)
    warmup_steps: int = 100  # linear warmup steps (capped at a tenth of the run)
    weight_decay: float = 0.1  # AdamW decay on matrices (norm gains get none)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    eval_every: int = 100  # steps between validation runs (0 = only at the end)
    eval_rows: int = 64  # validation windows per evaluation
    save_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest intermediate checkpoints kept
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: Literal["auto", "fp32", "bf16"] = (
        "auto"  # auto = bf16 where the hardware supports it
    )
    compile: bool = False  # torch.compile the model
    parallel: Literal["none", "ddp", "fsdp"] = (
        "none"  # with several processes (torchrun): ddp = replicate, fsdp = shard (ZeRO-3)
    )
    tp: int = 1  # tensor-parallel degree: each block split over groups of tp ranks (torchrun)
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    pp: int = 1  # pipeline-parallel stages (torchrun, one rank per stage)
    pp_chunks: int = 0  # pipeline chunks per micro-batch (0 = one row each)
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"  # pipeline schedule
    sharded_checkpoints: bool = False  # intermediate checkpoints: per-rank DCP shards, no gather
    seed: int = 0  # initialisation and data order

    def __post_init__(self) -> None:
        require(
            len(self.data) > 0, "no training data: pass a tokens directory (or --data PATH=WEIGHT)"
        )
        require(self.seq_len >= 8, f"--seq-len must be >= 8, got {self.seq_len}")
        if isinstance(self.micro_batch, str) and self.micro_batch != "auto":
            try:
                object.__setattr__(self, "micro_batch", int(self.micro_batch))
            except ValueError:
                raise ConfigError(
                    f"--micro-batch must be a number or 'auto', got {self.micro_batch!r}"
                ) from None
        require(
            self.micro_batch == "auto" or self.micro_batch >= 1,
            f"--micro-batch must be >= 1, got {self.micro_batch}",
        )
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(
            self.max_steps is None or self.max_steps >= 1,
            f"--max-steps must be >= 1, got {self.max_steps}",
        )
        require(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        require(
            self.parallel in ("none", "ddp", "fsdp"),
            f"--parallel must be none, ddp or fsdp, got {self.parallel!r}",
        )
        require(self.tp >= 1, f"--tp must be >= 1, got {self.tp}")
        require(
            self.tp == 1 or self.parallel != "ddp",
            "--tp with --parallel ddp is not offered: use --parallel fsdp (FSDP across TP groups)",
        )
        require(self.pp >= 1, f"--pp must be >= 1, got {self.pp}")
        require(self.pp_schedule in ("gpipe", "1f1b"), "--pp-schedule must be gpipe or 1f1b")
        if self.pp > 1:
            require(
                self.tp == 1 and self.parallel != "fsdp",
                "--pp combines with --parallel ddp (several pipelines), not with --tp or fsdp",
            )
            require(
                not (self.sharded_checkpoints or self.compile),
                "--pp does not support --sharded-checkpoints or --compile",
            )
            require(
                self.micro_batch != "auto",
                "--pp needs a fixed --micro-batch (auto does not size pipeline stages)",
            )
            chunks = self.pp_chunks or self.micro_batch
            require(
                chunks >= 1 and self.micro_batch % chunks == 0,
                f"--pp-chunks {chunks} must divide --micro-batch {self.micro_batch}",
            )
        require(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}",
        )
        if self.tokens != "auto":
            try:
                require(
                    float(self.tokens) > 0, f"--tokens must be > 0 or 'auto', got {self.tokens}"
                )
            except ValueError:
                raise ConfigError(
                    f"--tokens must be a number or 'auto', got {self.tokens!r}"
                ) from None

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with this run's overrides and the tokenizer's vocabulary."""
        over = {
            f: getattr(self, f)
            for f in (
                "d_model",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "d_ff",
                "rope_theta",
                "tie_embeddings",
            )
            if getattr(self, f) is not None
        }
        base = preset(self.model, vocab_size=vocab_size, **over)
        return base.replace(max_seq_len=max(base.max_seq_len, self.seq_len))


def parse_data(entries: tuple[str, ...]) -> list[tuple[str, float]]:
    """["a/=0.7", "b/"] -> [("a/", 0.7), ("b/", 1.0)]."""
    out = []
    for e in entries:
        path, sep, w = e.rpartition("=") if "=" in e else (e, "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise ConfigError(
                f"--data {e!r}: weight {w!r} is not a number",
                "use PATH=WEIGHT, e.g. --data web/=0.7",
            ) from None
        require(weight > 0, f"--data {e!r}: weight must be > 0")
        out.append((path if sep else e, weight))
    return out


@dataclass
class _Data:
    sampler: WindowSampler
    val: list[tuple[str, float, IndexedDataset]]
    tokenizer: Tokenizer
    inputs: list[dict]
    unigram: float | None


def _open_data(cfg: PretrainConfig) -> _Data:
    sources, val, inputs, tok, unigram = [], [], [], None, []
    for path, weight in parse_data(cfg.data):
        p = Path(path)
        if not is_artifact(p, "tokens"):
            kind = Manifest.read(p).kind if is_artifact(p) else None
            what = f"a {kind} artifact" if kind else "not a tokens artifact"
            raise InputError(f"{p} is {what}", f"tokenize it first: llmctl tokenize DOCS -o {p}")
        m = Manifest.read(p)
        t = Tokenizer.load(p)
        if tok is None:
            tok = t
        elif t.fingerprint != tok.fingerprint:
            raise InputError(
                f"{p} uses tokenizer {t.fingerprint}, {cfg.data[0]} uses {tok.fingerprint}",
                f"re-tokenize with one tokenizer: llmctl tokenize DOCS -o {p} --tokenizer {parse_data(cfg.data)[0][0]}",
            )
        train_ds = IndexedDataset(p / "train")
        if train_ds.n_tokens <= cfg.seq_len + 1:
            raise InputError(
                f"{p} has {train_ds.n_tokens} training tokens, fewer than one {cfg.seq_len}-token window",
                "add data or lower --seq-len",
            )
        sources.append(Source(str(p), train_ds, weight))
        val.append((str(p), weight, IndexedDataset(p / "val")))
        inputs.append(input_record(p, "tokens"))
        if "unigram_loss_val" in m.stats:
            unigram.append((weight, m.stats["unigram_loss_val"]))
    assert tok is not None
    ubase = (
        sum(w * u for w, u in unigram) / sum(w for w, _ in unigram)
        if unigram and len(unigram) == len(sources)
        else None
    )
    return _Data(WindowSampler(sources, cfg.seq_len, cfg.seed), val, tok, inputs, ubase)


def resolve_micro_batch(
    cfg: PretrainConfig, mcfg: ModelConfig, budget: float, world_size: int = 1, act_bytes: int = 2
) -> tuple[PretrainConfig, str]:
    """`--micro-batch auto` -> the config with the largest micro-batch whose estimated memory fits
    `budget` bytes per device (core/sizing.py), and a line saying so. The global batch stays
    `batch_tokens`: what does not fit one micro-step is gradient accumulation."""
    dp = data_parallel(world_size, cfg.tp)
    rows = cfg.batch_tokens // cfg.seq_len
    if cfg.batch_tokens % cfg.seq_len or rows % dp:
        raise ConfigError(
            f"--batch-tokens {cfg.batch_tokens} is not a whole number of {cfg.seq_len}-token rows "
            f"for each of {dp} data-parallel rank(s)",
            f"use a multiple of {cfg.seq_len * dp}",
        )
    mb, mem = sizing.auto_micro_batch(
        mcfg,
        rows_per_rank=rows // dp,
        seq_len=cfg.seq_len,
        budget=budget,
        strategy=sizing.strategy_of(cfg.parallel, cfg.tp),
        gpus=world_size,
        tp=cfg.tp,
        act_bytes=act_bytes,
        checkpointing=cfg.activation_checkpointing,
    )
    line = (
        f"--micro-batch auto: {mb} rows x {rows // dp // mb} accumulation steps "
        f"(~{mem.total / sizing.GIB:.2f} GiB estimated of {budget / sizing.GIB:.1f} GiB)"
    )
    return replace(cfg, micro_batch=mb), line


def plan(cfg: PretrainConfig, vocab_size: int, world_size: int = 1) -> dict:
    """Steps, accumulation and token budget of a run (raises ConfigError when they do not fit)."""
    mcfg = cfg.model_config(vocab_size)
    if cfg.micro_batch == "auto":
        raise ConfigError("--micro-batch auto must be resolved first (resolve_micro_batch)")
    rows = cfg.micro_batch * cfg.seq_len * world_size
    if cfg.batch_tokens % rows:
        raise ConfigError(
            f"--batch-tokens {cfg.batch_tokens} is not a multiple of micro-batch x seq-len x ranks = {rows}",
            f"use --batch-tokens {max(rows, round(cfg.batch_tokens / rows) * rows)}",
        )
    accum = cfg.batch_tokens // rows
    budget = chinchilla_tokens(mcfg) if cfg.tokens == "auto" else int(float(cfg.tokens))
    steps = cfg.max_steps or max(1, math.ceil(budget / cfg.batch_tokens))
    return {
        "model": mcfg,
        "grad_accum": accum,
        "steps": steps,
        "tokens": steps * cfg.batch_tokens,
        "params": param_count(mcfg),
        "flops_per_token": flops_per_token(mcfg, cfg.seq_len),
    }


def run(
    dst: Path,
    cfg: PretrainConfig,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
    runtime: Runtime | None = None,
) -> Manifest:
    """Train a model on tokens artifacts and write the final checkpoint to `dst`.

    Under torchrun every rank calls this; all return the same manifest, written by rank 0.

    Raises:
        InputError: Bad data or checkpoint; ConfigError: inconsistent settings;
        TrainingError: the loss became non-finite (the last checkpoint stays in `<dst>.partial`).
    """
    rt = runtime or Runtime.detect(cfg.device, cfg.precision)
    if cfg.pp > 1 and rt.world_size % cfg.pp:
        raise ConfigError(
            f"--pp {cfg.pp} needs a multiple of {cfg.pp} processes (one per stage), got "
            f"{rt.world_size}",
            f"torchrun --nproc_per_node {cfg.pp} -m llmctl pretrain ... --pp {cfg.pp}",
        )
    if rt.world_size % cfg.tp:
        raise ConfigError(
            f"--tp {cfg.tp} does not divide the {rt.world_size} process(es)",
            f"launch a multiple of {cfg.tp}: torchrun --nproc_per_node {cfg.tp} -m llmctl pretrain ...",
        )
    if data_parallel(rt.world_size, cfg.tp * cfg.pp) > 1 and cfg.parallel == "none":
        raise ConfigError(
            f"{rt.world_size} processes but --parallel none: each would train its own copy",
            "pass --parallel ddp (replicated) or --parallel fsdp (sharded)",
        )
    return on_ranks(
        Path(dst),
        rt,
        lambda: _run(Path(dst), cfg, rt, force=force, resume=resume, progress=progress),
    )


def _run(
    dst: Path, cfg: PretrainConfig, rt: Runtime, *, force: bool, resume: bool, progress: Progress
) -> Manifest:
    dp = data_parallel(rt.world_size, cfg.tp * cfg.pp)  # pipeline stages share their rows
    mode = cfg.parallel if dp > 1 or cfg.tp > 1 else "none"
    if not rt.is_main:
        progress = SILENT
    data = _open_data(cfg)
    if cfg.micro_batch == "auto":
        mcfg0 = (
            ModelConfig.from_dict(check_checkpoint_dir(Path(cfg.init))["model"])
            if cfg.init
            else cfg.model_config(data.tokenizer.vocab_size)
        )
        act = 2 if rt.precision == "bf16" else 4
        cfg, line = resolve_micro_batch(cfg, mcfg0, _agreed_memory(rt), rt.world_size, act)
        progress.log(line)
    p = plan(cfg, data.tokenizer.vocab_size, dp)
    torch.manual_seed(cfg.seed)
    # Under FSDP, TP or PP the model is built on the meta device and each rank materialises only
    # its own shards or stage (core/parallel.py), so no rank ever holds the whole model.
    meta = mode == "fsdp" or cfg.tp > 1 or cfg.pp > 1
    init_tensors = None
    if cfg.init and meta:
        # The tokens must be encoded with the checkpoint's tokenizer (check_checkpoint checks);
        # its tensors (one file, or DCP shards of any layout) are read one at a time into the
        # shards by `materialize` below.
        model = build_on_meta(check_checkpoint(Path(cfg.init), data.tokenizer)[1])
        init_tensors = iter_checkpoint_weights(Path(cfg.init))
    elif cfg.init:
        # The tokens must be encoded with the checkpoint's tokenizer: load_checkpoint checks fingerprints.
        model = load_checkpoint(
            Path(cfg.init), device=rt.device, tokenizer=data.tokenizer
        ).model.train()
    if cfg.init:
        data.inputs.append(input_record(cfg.init, "checkpoint"))
        p = {
            **p,
            "model": model.cfg,
            "params": param_count(model.cfg),
            "flops_per_token": flops_per_token(model.cfg, cfg.seq_len),
        }
        if cfg.seq_len > model.cfg.max_seq_len:
            raise ConfigError(
                f"--seq-len {cfg.seq_len} exceeds {cfg.init}'s context ({model.cfg.max_seq_len})"
            )
    elif meta:  # sharded over ranks: nothing is allocated before `materialize` below
        model = build_on_meta(p["model"])
    else:
        model = Transformer(p["model"])
        model.init_weights(torch.Generator().manual_seed(cfg.seed))  # = materialize's values
        model = model.to(rt.device)
    mcfg: ModelConfig = model.cfg
    run_dir = partial_path(dst)
    start, resumed_from, resumed_state = 0, None, None
    if resume:
        start, resumed_from, resumed_state = _resume(run_dir, cfg, model, rt, into_model=not meta)
    if cfg.tp > 1 and (mcfg.n_kv_heads % cfg.tp or mcfg.d_ff % cfg.tp):
        raise ConfigError(
            f"--tp {cfg.tp} must divide n_kv_heads ({mcfg.n_kv_heads}) and d_ff ({mcfg.d_ff})",
            "each rank holds whole K/V heads: pick a --tp that divides both",
        )
    # The weights of a meta-device model: the resumed one-file checkpoint's, else the --init
    # one's, else the seed's; a resumed sharded checkpoint's are read straight into the shards.
    state, source = None, None
    sharded = isinstance(resumed_state, Path)
    if resumed_state is not None and not sharded:
        state, source = resumed_state, resumed_from
    elif init_tensors is not None:
        state, source = init_tensors, Path(cfg.init)
    # TP splits the blocks over ranks and FSDP shards `model` in place; DDP returns a wrapper.
    pipe = None
    if cfg.pp > 1:
        if mcfg.n_layers < cfg.pp:
            raise ConfigError(f"--pp {cfg.pp} exceeds the model's {mcfg.n_layers} blocks")
        pipe = Pipeline(
            model,
            pp=cfg.pp,
            rank=rt.rank,
            device=rt.device,
            chunks=cfg.pp_chunks or cfg.micro_batch,
            schedule=cfg.pp_schedule,
            grad_accum=p["grad_accum"],
            checkpointing=cfg.activation_checkpointing,
        )
        wrapped = pipe.stage  # this rank's blocks; the optimizer holds only their parameters
        with checkpoint_errors(source):  # this stage's parameters only
            materialize(pipe.stage, rt.device, seed=cfg.seed, state=state, partial=True)
    else:
        wrapped = wrap(model, mode, rt, tp=cfg.tp, checkpointing=cfg.activation_checkpointing)
        if meta:
            with checkpoint_errors(source):  # a sharded checkpoint: every value is read next
                materialize(model, rt.device, seed=cfg.seed, state=state, fill=not sharded)
            if sharded:
                load_sharded_model(model, resumed_state)
    resumed_state = None
    opt = make_adamw(
        pipe.stage if pipe else model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)
    )
    if resumed_from is not None and (resumed_from / SHARDS).is_dir():
        load_sharded_optimizer(model, opt, resumed_from / SHARDS)
    elif resumed_from is not None:
        if pipe:
            pipe.load_optimizer_state(opt, read_optimizer_state(resumed_from))
        else:
            load_optimizer_state(model, opt, read_optimizer_state(resumed_from))
    with run_output(
        dst,
        rt,
        "pretrain",
        config=to_dict(cfg),
        inputs=data.inputs,
        force=force,
        resume=resume,
        start=start,
    ) as out:
        metrics = out.path / "metrics.jsonl"
        val_sets = [
            (name, w, val_windows(ds, cfg.seq_len, cfg.eval_rows)) for name, w, ds in data.val
        ]
        if pipe:  # stages pass activations of one shape: whole micro-batches of windows only
            val_sets = [(n, w, v[: len(v) - len(v) % cfg.micro_batch]) for n, w, v in val_sets]
        val_sets = [v for v in val_sets if len(v[2])]
        if not val_sets:
            progress.log(
                "no validation tokens (tokenize with a larger --val-fraction): validation is skipped"
            )
        train_model = torch.compile(wrapped) if cfg.compile else wrapped
        schedule = Schedule(
            total_steps=p["steps"],
            grad_accum=p["grad_accum"],
            lr=cfg.lr,
            min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10,
            warmup_steps=min(cfg.warmup_steps, p["steps"] // 10 + 1),
            grad_clip=cfg.grad_clip,
            eval_every=cfg.eval_every,
            save_every=cfg.save_every,
            tokens_per_step=cfg.batch_tokens,
            flops_per_token=p["flops_per_token"],
        )
        micro_rows = cfg.micro_batch

        def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = data.sampler.rows(
                step, micro, micro_rows, data_rank(rt.rank, cfg.tp * cfg.pp), dp
            )
            return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)

        def save(done: int) -> Path:
            path = out.path / "checkpoints" / f"step-{done:07d}"
            weights, opt_state, shards = None, None, None
            if cfg.sharded_checkpoints:  # every rank writes its part; rank 0 moves them in
                shards = path.with_name(f".{path.name}.shards")
                if rt.is_main and shards.exists():
                    shutil.rmtree(shards)
                barrier()
                save_sharded(model, opt, shards)
            else:  # collective under FSDP (all ranks gather); rank 0 alone writes
                weights, opt_state = gather_state()
            if not rt.is_main:
                return path
            m = Manifest(
                kind="checkpoint",
                stage="pretrain",
                config=to_dict(cfg),
                inputs=data.inputs,
                counts={"steps": done, "tokens": done * cfg.batch_tokens},
            )
            save_checkpoint(
                path,
                model,
                data.tokenizer,
                optimizer=opt_state,
                weights=weights,
                manifest=m,
                trainer_state=_trainer_state(done, cfg, rt),
                shards=shards,
            )
            for old in sorted((out.path / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            return path

        def gather_state() -> tuple[dict, dict]:
            """Weights and optimizer state, whole (collective under FSDP, TP and PP)."""
            if pipe:
                return pipe.full_model_state(), pipe.full_optimizer_state(opt)
            return full_model_state(model), full_optimizer_state(model, opt)

        def evaluate() -> dict[str, float]:
            res, total = {}, 0.0
            for name, w, windows in val_sets:
                losses = []
                for i in range(0, len(windows), micro_rows):
                    chunk = windows[i : i + micro_rows].to(rt.device)
                    x, y = chunk[:, :-1], chunk[:, 1:]
                    # Fused head + loss (no full logits); mean x count = the chunk's summed loss.
                    loss = pipe.loss(x, y) if pipe else model(x, targets=y)
                    losses.append(loss * y.numel())
                loss = float(sum(losses)) / windows[:, 1:].numel()
                res[f"val_loss/{Path(name).name}" if len(val_sets) > 1 else "val_loss"] = loss
                total += w * loss
            if len(val_sets) > 1:
                res["val_loss"] = total / sum(w for _, w, _ in val_sets)
            return res

        t0 = time.perf_counter()
        model.train()
        result = train(
            train_model,
            opt,
            rt,
            schedule,
            start_step=start,
            batch=batch,
            loss_fn=lm_loss,
            save=save,
            evaluate=evaluate if val_sets else None,
            metrics_path=metrics if rt.is_main else None,
            progress=progress,
            forward_backward=pipe.forward_backward if pipe else None,
            clip=pipe.clip_grad_norm if pipe else clip_grad_norm,
        )
        weights, opt_state = gather_state()
        if not rt.is_main:
            return out.manifest
        write_checkpoint_files(
            out.path,
            model,
            data.tokenizer,
            optimizer=opt_state,
            weights=weights,
            trainer_state=_trainer_state(result.step, cfg, rt),
        )
        records = read_metrics(metrics)
        plot_metrics(
            records, out.path / "loss.png", title=f"pretrain {dst.name}", baseline=data.unigram
        )
        out.manifest.tokenizer = {
            "fingerprint": data.tokenizer.fingerprint,
            "vocab_size": data.tokenizer.vocab_size,
        }
        out.manifest.counts = {
            "steps": result.step,
            "tokens": result.step * cfg.batch_tokens,
            "params": p["params"],
        }
        out.manifest.stats = {
            "train_loss": round(result.last_loss, 5),
            **{k: round(v, 5) for k, v in (result.last_val or {}).items()},
            "unigram_loss_val": data.unigram,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "resumed_from_step": start if resumed_from else None,
            "runtime": rt.describe(),
            "model": mcfg.to_dict(),
        }
    return out.manifest


def _agreed_memory(rt: Runtime) -> float:
    """The smallest device memory over all ranks (so every rank picks the same micro-batch)."""
    mem = torch.tensor([rt.memory_bytes()], dtype=torch.float64, device=rt.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(mem, op=dist.ReduceOp.MIN)  # NCCL: on the device
    return float(mem.item())


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 for stability under autocast, through the model's fused
    LM head + loss (`losses.linear_cross_entropy`: the full logits are never built)."""
    x, y = batch
    return model(x, targets=y)


def _trainer_state(step: int, cfg: PretrainConfig, rt: Runtime) -> dict:
    return {
        "step": step,
        "config": to_dict(cfg),
        "world_size": rt.world_size,
        "tp": cfg.tp,
        "pp": cfg.pp,
    }


def _resume(
    run_dir: Path, cfg: PretrainConfig, model: Transformer, rt: Runtime, *, into_model: bool
) -> tuple[int, Path, Iterable[tuple[str, torch.Tensor]] | Path | None]:
    """The step and checkpoint to resume from. The weights go into `model` (`into_model`), or,
    for a meta-device model sharded later, come back as what `materialize` reads them from: the
    one-file checkpoint's tensors one at a time, or its DCP shards directory."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise InputError(
            f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}", "run without --resume"
        )
    if into_model:
        loaded = load_checkpoint(ckpt, device=rt.device, trust_shards=True)  # this run's own files
        saved_cfg = loaded.model.cfg
    else:
        saved_cfg = ModelConfig.from_dict(check_checkpoint_dir(ckpt)["model"])
    if saved_cfg != model.cfg:
        raise ConfigError(
            f"{ckpt} has a different model shape than this run's flags",
            "resume with the original flags",
        )
    weights: Iterable[tuple[str, torch.Tensor]] | Path | None = None
    if into_model:
        model.load_state_dict(loaded.model.state_dict())
    elif (ckpt / WEIGHTS).is_file():
        weights = iter_weights(ckpt)  # read one tensor at a time while materialising
    else:
        weights = ckpt / SHARDS  # DCP shards: read straight into this rank's shards
    state = load_trainer_state(ckpt, None)  # the optimizer is loaded once the model is wrapped
    saved = state.get("config", {})
    names = {f.name for f in fields(PretrainConfig)}
    # micro_batch and the number of ranks only cut each step's rows (core/batches.py): free.
    diff = [
        k
        for k in TRAJECTORY
        if k in names and k in saved and k != "micro_batch" and to_dict(cfg)[k] != saved[k]
    ]
    if (ckpt / SHARDS).is_dir() and cfg.pp > 1:
        raise ConfigError(
            f"{ckpt} is a sharded checkpoint, which --pp does not read",
            "resume it without --pp, or start from its weights with --init "
            "(LLMCTL_TRUST_SHARDS=1) in a new --pp run",
        )
    if (ckpt / SHARDS).is_dir() and state.get("tp", 1) != cfg.tp:
        raise ConfigError(
            f"{ckpt} is a sharded checkpoint of a --tp {state.get('tp', 1)} run; its optimizer "
            f"shards do not fit --tp {cfg.tp}",
            f"resume with --tp {state.get('tp', 1)} (one-file checkpoints resume with any --tp)",
        )
    if diff:
        raise ConfigError(
            f"--resume with different settings than the run being resumed: {', '.join(diff)}",
            "pass the original flags (they are in " + str(ckpt / "trainer_state.json") + ")",
        )
    return int(state["step"]), ckpt, weights
