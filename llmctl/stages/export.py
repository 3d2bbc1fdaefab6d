"""export: checkpoint -> a Hugging Face model directory (kind "hf-model") or a GGUF file.

The output loads with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` as a
`LlamaForCausalLM` and with `AutoTokenizer.from_pretrained(DIR)` as a `LlamaTokenizer`(Fast):

    config.json              LlamaConfig (core/hf_compat.to_hf_config) plus BOS/EOS/PAD ids
    model.safetensors        weights under HF names (q/k/v and gate/up split out of the fused matrices)
    generation_config.json   stop at </s> or <|end|>, llmctl's default sampling settings
    tokenizer.model          our SentencePiece model, byte for byte
    tokenizer.json           the same BPE for the `tokenizers` library, written here without it
    tokenizer_config.json    LlamaTokenizer, special tokens, chat_template = CHAT_TEMPLATE_JINJA
    special_tokens_map.json  for transformers 4.x
    manifest.json            llmctl's provenance (ignored by transformers)

Tokenizer fidelity. llmctl's SentencePiece model has no dummy prefix and identity normalisation, while
a stock Llama tokenizer prepends "▁" to every text. The export sets `add_prefix_space: false` and
`legacy: false` (Metaspace pre-tokenizer with prepend_scheme "never", no normaliser), so the HF
tokenizer gives our ids for any text, indentation and Unicode included, and `apply_chat_template`
gives `render_chat`'s ids. The BPE merges are recovered from SentencePiece's piece scores (a piece
of higher score merges first), as transformers' own converter does. One deliberate difference: HF
tokenizers match special tokens in raw text ("<|user|>" typed by a user becomes the role marker),
where llmctl encodes such text as plain characters; pass `split_special_tokens=True` to HF to get
llmctl's behaviour.

GGUF (`--format gguf`, or an output path ending in ".gguf"): one file for llama.cpp, architecture
"llama", with the tokenizer and chat template in its metadata; see core/gguf_compat for the tensor
names and the RoPE row permutation. It is written atomically (temporary name, then rename) and has
no manifest; provenance is in its metadata (general.name, llmctl.version,
llmctl.tokenizer_fingerprint).

A reward model (config.json "head": reward) is refused: HF's LlamaForSequenceClassification has no
bias on its score head, and exporting only its language-model part would pass off an unusable LM.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from llmctl import __version__
from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.checkpoint import check_checkpoint_dir, load_checkpoint
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.hf_compat import to_hf_config, to_hf_state_dict
from llmctl.core.sampling import SamplingConfig
from llmctl.core.tokenizer import (
    BOS,
    CHAT_TEMPLATE_JINJA,
    CONTROL_TOKENS,
    EOS,
    PAD,
    UNK,
    Tokenizer,
)

KIND = "hf-model"
GGUF_KIND = "gguf-model"
FORMATS = ("hf", "gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Settings of `llmctl export`."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weight dtype (GGUF keeps norms in fp32)
    format: Literal["hf", "gguf"] = "hf"  # HF model directory, or one GGUF file for llama.cpp

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of fp32, bf16, fp16, got {self.dtype!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be hf or gguf, got {self.format!r}")


def run(src: Path, dst: Path, cfg: ExportConfig, *, force: bool = False) -> Manifest:
    """Write checkpoint `src` as a Hugging Face Llama model directory `dst` (or, with
    `cfg.format == "gguf"`, as one GGUF file `dst`: `run_gguf`).

    Args:
        src: llmctl checkpoint directory.
        dst: Output directory (written atomically, with a manifest of kind "hf-model").
        cfg: Export settings.
        force: Replace an existing `dst`.

    Returns:
        The manifest (counts: parameters, tensors; stats: bytes written).

    Raises:
        InputError: `src` is not a checkpoint, or is a reward model.
    """
    refuse_reward_model(src)
    if cfg.format == "gguf":
        return run_gguf(src, dst, cfg, force=force)
    ck = load_checkpoint(src)
    tok, mcfg = ck.tokenizer, ck.model.cfg
    with commit_output(
        dst,
        kind=KIND,
        stage="export",
        config=asdict(cfg),
        inputs=[input_record(src, "checkpoint")],
        force=force,
    ) as out:
        weights = {
            k: v.detach().to(DTYPES[cfg.dtype]).contiguous().clone()
            for k, v in to_hf_state_dict(ck.model).items()
        }
        save_file(weights, str(out.path / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out.path / "config.json", hf_model_config(ck.model.cfg, tok, cfg.dtype))
        _write_json(out.path / "generation_config.json", generation_config(tok))
        write_hf_tokenizer(out.path, tok, mcfg.max_seq_len)
        out.manifest.tokenizer = {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size}
        out.manifest.counts = {
            "parameters": sum(v.numel() for v in weights.values()),
            "tensors": len(weights),
        }
        out.manifest.stats = {
            "dtype": cfg.dtype,
            "bytes": sum(p.stat().st_size for p in out.path.iterdir() if p.is_file()),
            "architecture": "LlamaForCausalLM",
        }
    return out.manifest


def run_gguf(src: Path, dst: Path, cfg: ExportConfig, *, force: bool = False) -> Manifest:
    """Write checkpoint `src` as one GGUF file `dst` (see core/gguf_compat).

    Returns:
        A manifest of kind "gguf-model" (not written to disk: a GGUF file is one file).
    """
    from llmctl.core.gguf_compat import write_gguf

    dst = Path(dst)
    check_output(dst, force)
    if dst.is_dir():
        raise InputError(f"{dst} is a directory", "GGUF output is one file: give -o NAME.gguf")
    ck = load_checkpoint(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    t0 = time.time()
    try:
        n = write_gguf(tmp, ck.model, ck.tokenizer, dtype=cfg.dtype, name=Path(src).resolve().name)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    m = Manifest(
        kind=GGUF_KIND,
        stage="export",
        config=asdict(cfg),
        inputs=[input_record(src, "checkpoint")],
        command=list(sys.argv),
    )
    m.tokenizer = {"fingerprint": ck.tokenizer.fingerprint, "vocab_size": ck.tokenizer.vocab_size}
    m.counts = {"parameters": sum(p.numel() for p in ck.model.parameters()), "tensors": n}
    m.stats = {"dtype": cfg.dtype, "bytes": dst.stat().st_size, "architecture": "llama (GGUF)"}
    m.wall_time_s = round(time.time() - t0, 3)
    return m


def refuse_reward_model(src: Path) -> None:
    """Raise if `src` is a reward-model checkpoint (see the module docstring for why)."""
    head = check_checkpoint_dir(src).get("head") or {}
    if head.get("kind") == "reward":
        raise InputError(
            f"{src} is a reward model (scalar head in {head.get('file', 'head.safetensors')}); "
            "export writes causal language models only",
            "export the policy it scores instead (the sft, dpo or ppo checkpoint)",
        )


def hf_model_config(cfg: Any, tok: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM: the architecture plus special-token ids and dtype."""
    return {
        **to_hf_config(cfg),
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "dtype": _HF_DTYPE_NAMES[dtype],  # transformers >= 5
        "torch_dtype": _HF_DTYPE_NAMES[dtype],  # transformers 4.x
        "llmctl_version": __version__,
    }


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    """generation_config.json: stop at </s> or <|end|> (end of an assistant turn); sample with
    llmctl's defaults."""
    s = SamplingConfig()
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.eos_id, tok.end_id],
        "pad_token_id": tok.pad_id,
        "do_sample": True,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
    }


# -- tokenizer files ------------------------------------------------------------------------------


def write_hf_tokenizer(directory: Path, tok: Tokenizer, max_len: int) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    directory = Path(directory)
    tok.save(directory)
    _write_json(directory / "tokenizer.json", tokenizer_json(tok))
    _write_json(directory / "tokenizer_config.json", tokenizer_config(tok, max_len))
    _write_json(
        directory / "special_tokens_map.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": PAD,
            "additional_special_tokens": CONTROL_TOKENS,
        },
    )


def _special_tokens(tok: Tokenizer) -> list[tuple[int, str]]:
    """(id, piece) of every special token, by id."""
    return sorted((tok.sp.piece_to_id(p), p) for p in (UNK, BOS, EOS, PAD, *CONTROL_TOKENS))


def bpe_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    """BPE merges in priority order, recovered from the SentencePiece vocabulary.

    SentencePiece's BPE merges the adjacent pair whose concatenation is the highest-scoring normal
    piece; a `tokenizers` BPE merges the pair of lowest rank. So every split of a normal piece into
    two normal pieces becomes a merge, ranked by the piece's score (ties by ids, for determinism).
    Control, byte and unknown pieces never arise from merges.
    """
    sp = tok.sp
    normal = {
        sp.id_to_piece(i): i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-sp.get_score(pid), pid, normal[left], normal[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _added_token(i: int, piece: str) -> dict[str, Any]:
    return {
        "id": i,
        "content": piece,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The `tokenizers` serialisation of our SentencePiece BPE (no `tokenizers` import needed).

    No normaliser; a Metaspace pre-tokenizer that only turns " " into "▁" (no prefix, no split);
    byte fallback for characters outside the vocabulary; BOS added by the post-processor, as
    `encode(text, bos=True)` does.
    """
    sp = tok.sp
    bos = [{"SpecialToken": {"id": BOS, "type_id": 0}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, p) for i, p in _special_tokens(tok)],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "never",
            "split": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [*bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                *bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [tok.bos_id], "tokens": [BOS]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {sp.id_to_piece(i): i for i in range(sp.get_piece_size())},
            "merges": [list(m) for m in bpe_merges(tok)],
        },
    }


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict[str, Any]:
    """tokenizer_config.json: class, special tokens, prefix-space settings, chat template."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": CONTROL_TOKENS,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in _added_token(i, p).items() if k != "id"}
            for i, p in _special_tokens(tok)
        },
        "add_bos_token": True,
        "add_eos_token": False,
        # No dummy prefix: without these two, transformers prepends "▁" to every text.
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE_JINJA,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
