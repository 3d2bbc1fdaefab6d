"""Checkpoint directories: weights in safetensors, everything else in JSON. Nothing is unpickled
unasked.

    model.safetensors          model weights (a tied LM head is stored once, as embed.weight)
    config.json                {"model": ModelConfig, "tokenizer": {fingerprint, vocab_size}, ...}
    tokenizer.model            the SentencePiece model the weights were trained with
    trainer_state.safetensors  optimizer moments and RNG state (only in resumable checkpoints)
    trainer_state.json         step, tokens seen, optimizer hyper-parameters, anything JSON-able
    manifest.json              kind "checkpoint", written last (see core/artifacts.py)
    shards/                    instead of the two safetensors files in a sharded checkpoint: weights
                               and optimizer state as torch.distributed.checkpoint shards, written by
                               every rank of a multi-process run (core/parallel.py). DCP's
                               `.metadata` file is a pickle, so `load_checkpoint` refuses shards
                               unless told they are trusted: `pretrain --resume` trusts its own run
                               directory, anything else needs LLMCTL_TRUST_SHARDS=1 (then `export`
                               turns one into the pickle-free one-file form)

A directory is written under a temporary name and renamed, so a crash mid-save leaves the previous
checkpoint intact. Loading checks every file and names what is wrong: missing files, a config that
is not ours, a truncated weights file, a tokenizer whose fingerprint differs from the one recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmctl import __version__
from llmctl.core.artifacts import Manifest, atomic_write_text, dir_fingerprint, is_artifact
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import MODEL_FILE, Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
SHARDS = "shards"
REQUIRED = (WEIGHTS, CONFIG, MODEL_FILE)


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    model: Transformer
    tokenizer: Tokenizer
    config: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        """The architecture."""
        return self.model.cfg


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict with the tied head dropped (safetensors stores no aliases)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(
    path: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    manifest: Manifest | None = None,
    extra_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_files: Callable[[Path], None] | None = None,
    shards: Path | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temporary name, then rename over `path`).

    Args:
        path: Target directory.
        model: The model (unwrapped).
        tokenizer: Its tokenizer.
        optimizer: Saved with `trainer_state` for exact resume (or its `state_dict()`, e.g. one
            gathered from shards by `parallel.full_optimizer_state`).
        trainer_state: JSON-able resume state (step, tokens, ...).
        manifest: Written last; a default "checkpoint" manifest if None.
        extra_config: Merged into config.json (e.g. {"head": "reward"} for later stages).
        weights: The plain-Transformer state dict to store instead of `model`'s own (e.g. LoRA
            deltas merged in while the model itself still carries adapters).
        extra_tensors: More resume state (adapters, value heads), stored in the trainer state file;
            read back with `load_extra_tensors`.
        extra_files: Called with the temporary directory to add files (a reward head, say) before
            the manifest is written, so they count in its fingerprint and share the atomic rename.
        shards: A finished torch.distributed.checkpoint directory (`parallel.save_sharded`), moved
            in as `shards/` in place of model.safetensors and the optimizer moments.

    Returns:
        `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_checkpoint_files(
        tmp,
        model,
        tokenizer,
        optimizer=optimizer,
        trainer_state=trainer_state,
        extra_config=extra_config,
        weights=weights,
        extra_tensors=extra_tensors,
        weights_file=shards is None,
    )
    if shards is not None:
        os.replace(shards, tmp / SHARDS)
    if extra_files is not None:
        extra_files(tmp)
    m = manifest or Manifest(kind="checkpoint", stage="checkpoint")
    m.fingerprint = dir_fingerprint(tmp)
    m.tokenizer = {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}
    m.write(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def write_checkpoint_files(
    directory: Path,
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    weights_file: bool = True,
) -> None:
    """Write a checkpoint's files (no manifest) into an existing directory (arguments as in
    `save_checkpoint`; `weights_file=False` leaves model.safetensors to a `shards/` directory)."""
    directory = Path(directory)
    if weights_file:
        save_file(
            weights if weights is not None else model_state(model),
            str(directory / WEIGHTS),
            metadata={"format": "pt", "llmctl": __version__},
        )
    cfg = {
        "model": model.cfg.to_dict(),
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
        "llmctl_version": __version__,
        "architecture": "llmctl-llama",
        **(extra_config or {}),
    }
    (directory / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer.save(directory)
    if optimizer is not None or trainer_state is not None or extra_tensors:
        tensors, meta = _pack_optimizer(optimizer) if optimizer is not None else ({}, {})
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        for k, v in (extra_tensors or {}).items():
            tensors[f"extra.{k}"] = v.detach().contiguous().cpu()
        save_file(tensors, str(directory / STATE_TENSORS))
        state = {**(trainer_state or {}), "optimizer": meta}
        (directory / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")


def _pack_optimizer(
    opt: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unpack_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def check_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Validate a checkpoint directory's files and return its config.json.

    Raises:
        InputError: Missing files, or a config.json that is not an llmctl model config.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(
            f"checkpoint {path} does not exist", "pass a directory written by `llmctl pretrain`"
        )
    sharded = (path / SHARDS).is_dir()
    missing = [f for f in REQUIRED if not (path / f).is_file() and not (f == WEIGHTS and sharded)]
    if missing:
        found = sorted(p.name for p in path.iterdir())[:8]
        hint = "pass a directory written by `llmctl pretrain`"
        if (path / "checkpoints").is_dir():
            hint = f"this looks like a run directory; pass one of {path / 'checkpoints'}/*"
        raise InputError(
            f"{path} is not a complete llmctl checkpoint: missing {', '.join(missing)} (found: {', '.join(found) or 'nothing'})",
            hint,
        )
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        ModelConfig.from_dict(cfg["model"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ConfigError) as e:
        raise InputError(
            f"{path / CONFIG} is not an llmctl model config ({type(e).__name__}: {e})",
            "a Hugging Face model must be imported first (llmctl import-hf)",
        ) from None
    return cfg


def check_checkpoint(
    path: Path, tokenizer: Tokenizer | None = None
) -> tuple[dict[str, Any], ModelConfig, Tokenizer]:
    """Everything `load_checkpoint` checks before it reads the weights: the files, config.json,
    and that `tokenizer` (default: the stored one) is the one the model was trained with.

    Returns:
        config.json, the model config and the tokenizer to use.

    Raises:
        InputError: Missing or invalid files, or a tokenizer mismatch.
    """
    path = Path(path)
    cfg = check_checkpoint_dir(path)
    mcfg = ModelConfig.from_dict(cfg["model"])
    stored = Tokenizer.load(path / MODEL_FILE)
    tok = tokenizer or stored
    expected = cfg.get("tokenizer", {}).get("fingerprint")
    if expected and tok.fingerprint != expected:
        raise InputError(
            f"tokenizer {tok.fingerprint} does not match checkpoint {path} (trained with {expected})",
            f"use the checkpoint's own tokenizer ({path / MODEL_FILE}) or re-tokenize with it: "
            f"llmctl tokenize DOCS -o TOKENS --tokenizer {path}",
        )
    if tok.vocab_size != mcfg.vocab_size:
        raise InputError(f"tokenizer has {tok.vocab_size} ids, model expects {mcfg.vocab_size}")
    return cfg, mcfg, tok


def load_checkpoint(
    path: Path,
    device: torch.device | str = "cpu",
    tokenizer: Tokenizer | None = None,
    *,
    trust_shards: bool = False,
    inference: bool = False,
) -> Checkpoint:
    """Load a checkpoint's model (fp32, eval mode) and tokenizer.

    Args:
        path: Checkpoint directory.
        device: Where to put the weights.
        tokenizer: Use this tokenizer instead of the stored one; its fingerprint must match.
        trust_shards: Read a sharded checkpoint's `shards/` (its DCP `.metadata` is a pickle, which
            unpickles arbitrary objects): only for checkpoints this run wrote itself (`--resume`),
            or when the user opts in with the environment variable LLMCTL_TRUST_SHARDS=1.
        inference: Only to generate or score, not to train: lay the weights out for decoding
            (`Transformer.inference_layout`; values unchanged).

    Raises:
        InputError: Any file missing, corrupt, truncated or inconsistent, or a tokenizer mismatch.
    """
    path = Path(path)
    cfg, mcfg, tok = check_checkpoint(path, tokenizer)
    try:
        if (path / WEIGHTS).is_file():
            sd = load_file(str(path / WEIGHTS), device="cpu")
        else:
            _require_trusted(path, trust_shards)
            sd = _load_shards(path / SHARDS, mcfg)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        where = path / WEIGHTS if (path / WEIGHTS).is_file() else path / SHARDS
        raise InputError(
            f"{where} is corrupt or truncated ({_dcp_error(e)})",
            "re-save or re-download the checkpoint",
        ) from None
    model = Transformer(mcfg)
    if mcfg.tie_embeddings:
        sd["lm_head.weight"] = sd.get("embed.weight", torch.empty(0))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise InputError(
            f"{path / WEIGHTS} does not match its config.json: {' '.join(first[:2])[:300]}"
        ) from None
    model = model.to(device).eval()
    if inference:
        model.inference_layout()
    return Checkpoint(path, model, tok, cfg)


@contextlib.contextmanager
def checkpoint_errors(path: Path | None) -> Iterator[None]:
    """Turn `parallel.materialize`'s ValueError about the tensors read from checkpoint `path`
    into the one-line InputError `load_checkpoint` gives for the same file (None: no file read,
    so a ValueError is a bug and passes through)."""
    try:
        yield
    except ValueError as e:
        if path is None:
            raise
        file = Path(path) / WEIGHTS
        raise InputError(
            f"{file if file.is_file() else Path(path) / SHARDS} does not match its config.json: {e}",
            "re-save or re-download the checkpoint",
        ) from None


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A one-file checkpoint's weights, one tensor at a time, read from the memory-mapped file (for
    `parallel.materialize`: a rank never holds more than one whole tensor of them).

    Raises:
        InputError: The file is corrupt or truncated.
    """
    file = Path(path) / WEIGHTS
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{file} is corrupt or truncated ({e})", "re-save or re-download the checkpoint"
        ) from None


def iter_checkpoint_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's weights one whole tensor at a time: `iter_weights` for the one-file form,
    `iter_shard_weights` (behind LLMCTL_TRUST_SHARDS=1) for DCP shards."""
    if (Path(path) / WEIGHTS).is_file():
        return iter_weights(path)
    return iter_shard_weights(path)


def iter_shard_weights(
    path: Path, *, trust_shards: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """A sharded checkpoint's weights, one whole tensor at a time in the fused layout, as
    `iter_weights` gives a one-file checkpoint's (for `parallel.materialize`). Each process reads
    them from the DCP files on its own (no collective), so the layout and the number of ranks
    that wrote them do not matter: a tensor-parallel run's q/k/v (gate/up) parts are read and
    joined into the fused tensor. `trust_shards` as for `load_checkpoint`.

    Raises:
        InputError: Shards not trusted, or missing, corrupt or not those of the config.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    _require_trusted(path, trust_shards)  # checked now, not at the first tensor
    mcfg = ModelConfig.from_dict(check_checkpoint_dir(path)["model"])
    directory = path / SHARDS
    try:
        saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - DCP raises what its reader met: name the directory
        raise InputError(
            f"{directory} is not readable DCP shards ({str(e).strip()[:200]})",
            "re-save or re-download the checkpoint",
        ) from None
    return _shard_tensors(directory, mcfg, saved)


def _shard_tensors(
    directory: Path, mcfg: ModelConfig, saved: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    from llmctl.core.parallel import unfused_parts

    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in Transformer(mcfg).named_parameters()]
    split = any(".attn.wq." in k for k in saved)  # written by a tensor-parallel run
    planner = DefaultLoadPlanner(allow_partial_load=True)
    for name, shape in shapes:  # named_parameters lists a tied head once, as embed.weight
        parts = unfused_parts(name) if split else None
        names = list(parts or (name,))
        missing = [n for n in names if f"model.{n}" not in saved]
        if missing:
            raise InputError(
                f"{directory} holds no {missing[0]}: not the shards of its config.json's model",
                "re-save or re-download the checkpoint",
            )
        tensors = {n: torch.empty(tuple(saved[f"model.{n}"].size)) for n in names}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(
                    {"model": tensors}, checkpoint_id=str(directory), planner=planner, no_dist=True
                )
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a truncated shard, say
            raise InputError(
                f"{directory} is corrupt or truncated ({_dcp_error(e)})",
                "re-save or re-download the checkpoint",
            ) from None
        whole = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
        if tuple(whole.shape) != tuple(shape):
            raise InputError(
                f"{directory}: {name} has shape {tuple(whole.shape)}, its config.json's model "
                f"{tuple(shape)}",
                "re-save or re-download the checkpoint",
            )
        yield name, whole


def _dcp_error(e: BaseException) -> str:
    """The line that says what went wrong in a DCP error: its last (a CheckpointException
    carries each rank's whole traceback)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _require_trusted(path: Path, trust_shards: bool) -> None:
    if not (trust_shards or os.environ.get("LLMCTL_TRUST_SHARDS") == "1"):
        raise InputError(
            f"{path} is a sharded checkpoint: its torch.distributed.checkpoint metadata is a "
            "pickle, which llmctl does not load unasked",
            "if you wrote it yourself, set LLMCTL_TRUST_SHARDS=1 (e.g. for `llmctl export`, "
            "which writes the pickle-free one-file form); `pretrain --resume` reads its own",
        )


def _load_shards(directory: Path, mcfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full weights from a torch.distributed.checkpoint directory, in this one process (or
    collectively, when a process group is up)."""
    import torch.distributed.checkpoint as dcp

    from llmctl.core.parallel import fuse_state, unfuse

    template = Transformer(mcfg)
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    if any(".attn.wq." in k for k in saved):  # written by a tensor-parallel run: unfused names
        unfuse(template)
    sd = template.state_dict()
    if mcfg.tie_embeddings:
        sd.pop("lm_head.weight")  # one tensor with embed.weight; tied again by the caller
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # "assuming ... to load in a single process": yes, it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": sd}, checkpoint_id=str(directory))
    except CheckpointException as e:  # a BaseException: made one load_checkpoint reports
        raise RuntimeError(_dcp_error(e)) from None
    return fuse_state(sd)


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore optimizer moments and RNG state from a checkpoint; return trainer_state.json.

    Raises:
        InputError: The checkpoint holds no trainer state (not resumable).
    """
    path = Path(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise InputError(
            f"{path} has no trainer state to resume from", "start a new run without --resume"
        )
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path / STATE_JSON} is corrupt ({e})", "resume from an earlier checkpoint"
        ) from None
    try:
        tensors = load_file(str(path / STATE_TENSORS), device="cpu")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path / STATE_TENSORS} is corrupt ({e})") from None
    if optimizer is not None and meta.get("optimizer"):
        optimizer.load_state_dict(_unpack_optimizer(tensors, meta["optimizer"]))
    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"])
    return meta


def read_optimizer_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint's optimizer state as `optimizer.state_dict()` gave it (None when not stored),
    for loaders that do not hold a plain optimizer (`parallel.load_optimizer_state`).

    Raises:
        InputError: The trainer state files are missing or corrupt.
    """
    path = Path(path)
    meta = load_trainer_state(path, None)
    if not meta.get("optimizer"):
        return None
    return _unpack_optimizer(load_file(str(path / STATE_TENSORS), device="cpu"), meta["optimizer"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete `checkpoints/step-N` in a training run directory (None when there is none)."""
    ckpts = sorted(
        (Path(run_dir) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    ckpts = [c for c in ckpts if is_artifact(c)]
    return ckpts[-1] if ckpts else None


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` a checkpoint was saved with (empty when none).

    Raises:
        InputError: The trainer state file is corrupt.
    """
    f = Path(path) / STATE_TENSORS
    if not f.is_file():
        return {}
    try:
        tensors = load_file(str(f), device="cpu")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{f} is corrupt ({e})") from None
    return {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}


def write_config_json(path: Path, cfg: dict[str, Any]) -> None:
    """Rewrite config.json atomically (used by later stages that add heads)."""
    atomic_write_text(Path(path) / CONFIG, json.dumps(cfg, indent=2) + "\n")
