"""Write an llmctl checkpoint as a GGUF file for llama.cpp (architecture "llama").

Tensors take llama.cpp's names; the fused projections are split as for Hugging Face (see
`core/hf_compat`):

    embed.weight                 token_embd.weight
    layers.{i}.attn_norm.weight  blk.{i}.attn_norm.weight
    layers.{i}.attn.wqkv.weight  blk.{i}.attn_q.weight / attn_k.weight / attn_v.weight (q, k permuted)
    layers.{i}.attn.wo.weight    blk.{i}.attn_output.weight
    layers.{i}.mlp_norm.weight   blk.{i}.ffn_norm.weight
    layers.{i}.mlp.w13.weight    blk.{i}.ffn_gate.weight / ffn_up.weight
    layers.{i}.mlp.w2.weight     blk.{i}.ffn_down.weight
    norm.weight                  output_norm.weight
    lm_head.weight               output.weight (left out with tied embeddings; llama.cpp then uses
                                 token_embd)

RoPE layout. Our q/k follow HF's convention: each head's rotation pairs are (j, j + hd/2), the two
halves of the head. llama.cpp's "llama" graph rotates adjacent pairs (2j, 2j + 1) (ggml's "normal"
RoPE), so, like llama.cpp's own converter for HF Llama checkpoints, the rows of each q and k head are
reordered from [x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}] to [x_0, y_0, x_1, y_1, ...]
(`permute_rope_rows`; `unpermute_rope_rows` inverts it). Attention scores are unchanged because q and
k are permuted alike.

Tokenizer. llama.cpp's SentencePiece tokenizer ("llama") with our pieces, scores and piece types
(unknown, control, byte for the <0xNN> fallback pieces, normal), BOS added, no space prefix (our
model has no dummy prefix), <|end|> as the end-of-turn token and the Jinja chat template. Dtypes:
fp32, or fp16 / bf16 for the matrices with the 1-D norm weights kept in fp32, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmctl import __version__
from llmctl.core.model import ModelConfig
from llmctl.core.tokenizer import CHAT_TEMPLATE_JINJA, Tokenizer

ARCH = "llama"


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from HF's half-split RoPE layout to llama.cpp's
    interleaved one: within each head, row j and row j + hd/2 become rows 2j and 2j + 1."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_rope_rows`."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def to_gguf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight of an llmctl `Transformer`, q/k permuted."""
    cfg: ModelConfig = model.cfg
    sd = model.state_dict()
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    yield "token_embd.weight", sd["embed.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"blk.{i}."
        q, k, v = sd[src + "attn.wqkv.weight"].split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = sd[src + "mlp.w13.weight"].split(cfg.d_ff, dim=0)
        yield dst + "attn_norm.weight", sd[src + "attn_norm.weight"]
        yield dst + "attn_q.weight", permute_rope_rows(q, cfg.n_heads)
        yield dst + "attn_k.weight", permute_rope_rows(k, cfg.n_kv_heads)
        yield dst + "attn_v.weight", v
        yield dst + "attn_output.weight", sd[src + "attn.wo.weight"]
        yield dst + "ffn_norm.weight", sd[src + "mlp_norm.weight"]
        yield dst + "ffn_gate.weight", gate
        yield dst + "ffn_up.weight", up
        yield dst + "ffn_down.weight", sd[src + "mlp.w2.weight"]
    yield "output_norm.weight", sd["norm.weight"]
    if not cfg.tie_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def token_types(tok: Tokenizer) -> list[int]:
    """gguf.TokenType of every piece: unknown, control (BOS/EOS/PAD and the chat markers), byte
    (the <0xNN> fallback pieces), unused, or normal."""
    import gguf

    sp, out = tok.sp, []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        else:
            t = gguf.TokenType.NORMAL
        out.append(int(t))
    return out


def _numpy(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for `t`; 1-D tensors stay fp32 whatever `dtype`."""
    import gguf

    t = t.detach().to("cpu")
    if t.ndim == 1 or dtype == "fp32":
        return t.to(torch.float32).contiguous().numpy(), None
    if dtype == "fp16":
        return t.to(torch.float16).contiguous().numpy(), None
    # bf16: numpy has no bfloat16, so pass the raw 16-bit words with their GGML type.
    bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return bits, gguf.GGMLQuantizationType.BF16


def file_type(dtype: str) -> int:
    """general.file_type for an export dtype."""
    import gguf

    return int(
        {
            "fp32": gguf.LlamaFileType.ALL_F32,
            "fp16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )


def write_gguf(path: Path, model: nn.Module, tok: Tokenizer, *, dtype: str, name: str) -> int:
    """Write `model` and `tok` as a GGUF file at `path` (not atomically; the caller renames).

    Returns:
        The number of tensors written.
    """
    import gguf

    cfg: ModelConfig = model.cfg
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(name)
    w.add_file_type(file_type(dtype))
    w.add_string("llmctl.version", __version__)
    w.add_string("llmctl.tokenizer_fingerprint", tok.fingerprint)

    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)

    sp = tok.sp
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(sp.get_piece_size())])
    w.add_token_scores([float(sp.get_score(i)) for i in range(sp.get_piece_size())])
    w.add_token_types(token_types(tok))
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_eot_token_id(tok.end_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE_JINJA)

    n = 0
    for tname, t in to_gguf_tensors(model):
        arr, raw = _numpy(t, dtype)
        w.add_tensor(tname, arr, raw_dtype=raw)
        n += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return n
