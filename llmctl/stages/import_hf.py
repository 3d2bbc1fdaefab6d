"""import-hf: a Hugging Face Llama model directory -> an llmctl checkpoint.

Reads config.json (LlamaForCausalLM: SiLU MLP, no biases, plain RoPE), the weights from
model.safetensors or a sharded model.safetensors.index.json (pytorch_model.bin is refused: llmctl
never unpickles), and tokenizer.model. Weights are stored in fp32, as every llmctl checkpoint; the
fused q/k/v and gate/up matrices are rebuilt by core/hf_compat.from_hf_state_dict. A directory
written by `llmctl export` comes back bit for bit, with the same tokenizer fingerprint.

The tokenizer must be a SentencePiece model (tokenizer.model) that carries llmctl's special tokens
(<pad> and the chat markers <|system|>, <|user|>, <|assistant|>, <|end|>), because every later stage
renders chats with them. A model with only tokenizer.json (byte-level BPE such as Llama 3's) or a
foreign SentencePiece model (Llama 2's has no <pad> and no chat markers) is refused with the reason;
adding tokens would change the vocabulary and the embedding matrix, which is a training decision, not
an import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmctl.core.artifacts import Manifest, check_output, input_record
from llmctl.core.checkpoint import save_checkpoint
from llmctl.core.config import require
from llmctl.core.errors import ConfigError, InputError, LlmctlError
from llmctl.core.hf_compat import from_hf_state_dict
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import MODEL_FILE, Tokenizer

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True, kw_only=True)
class ImportHfConfig:
    """Settings of `llmctl import-hf`."""

    max_seq_len: int = 0  # context of the checkpoint (0 = the model's max_position_embeddings)

    def __post_init__(self) -> None:
        require(
            self.max_seq_len == 0 or self.max_seq_len >= 2,
            f"--max-seq-len must be 0 (from config.json) or >= 2, got {self.max_seq_len}",
        )


def run(src: Path, dst: Path, cfg: ImportHfConfig, *, force: bool = False) -> Manifest:
    """Convert the HF Llama directory `src` into the llmctl checkpoint `dst`.

    Args:
        src: Directory with config.json, safetensors weights and tokenizer.model.
        dst: Output checkpoint directory (written atomically).
        cfg: Import settings.
        force: Replace an existing `dst`.

    Returns:
        The checkpoint's manifest.

    Raises:
        InputError: Missing files, a non-Llama architecture, an unsupported Llama variant, a
            tokenizer llmctl cannot use, or weights that do not fit the config.
    """
    src = Path(src)
    if not (src / "config.json").is_file():
        raise InputError(
            f"{src} has no config.json", "pass a Hugging Face model directory (save_pretrained)"
        )
    check_output(dst, force)
    hf = _read_json(src / "config.json")
    mcfg = model_config_from_hf(hf, src, cfg.max_seq_len)
    tok = load_tokenizer(src)
    if tok.vocab_size != mcfg.vocab_size:
        raise InputError(
            f"{src}/{MODEL_FILE} has {tok.vocab_size} pieces but config.json says vocab_size "
            f"{mcfg.vocab_size}",
            "llmctl needs one embedding row per tokenizer id; padded vocabularies are not supported",
        )
    model = Transformer(mcfg)
    sd = {k: v.to(torch.float32) for k, v in read_hf_weights(src).items()}
    try:
        model.load_state_dict(from_hf_state_dict(sd, mcfg), strict=True)
    except RuntimeError as e:
        raise InputError(
            f"weights in {src} do not fit its config.json: {str(e).strip().splitlines()[-1][:300]}"
        ) from None
    manifest = Manifest(
        kind="checkpoint",
        stage="import-hf",
        config=asdict(cfg),
        inputs=[input_record(src, "hf-model")],
        counts={"parameters": sum(p.numel() for p in model.parameters())},
        stats={
            "source_architecture": (hf.get("architectures") or ["?"])[0],
            "tokenizer": tok.fingerprint,
        },
    )
    save_checkpoint(
        Path(dst), model, tok, manifest=manifest, extra_config={"imported_from": str(src)}
    )
    return manifest


def model_config_from_hf(hf: dict[str, Any], src: Path, max_seq_len: int = 0) -> ModelConfig:
    """The llmctl ModelConfig of a HF LlamaConfig dict.

    Raises:
        InputError: Not a Llama model, or a Llama variant llmctl's decoder does not compute.
    """
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama":
        raise InputError(
            f"{src} is a {hf.get('model_type', '?')!r} model ({', '.join(arch) or 'no architectures'}); "
            "import-hf reads Llama-architecture models only (model_type 'llama')",
            "llmctl's decoder is Llama-style (RMSNorm, RoPE, SwiGLU, GQA); other architectures "
            "need their own conversion",
        )
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r} (llmctl uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("attention/MLP biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        unsupported.append(f"RoPE scaling {rope_type!r} (llmctl implements plain RoPE)")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // n_heads):
        unsupported.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if unsupported:
        raise InputError(
            f"{src} uses Llama features llmctl does not support: {'; '.join(unsupported)}"
        )
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_ff=hf["intermediate_size"],
            max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise InputError(f"{src}/config.json has no {e.args[0]!r}") from None
    except ConfigError as e:
        raise InputError(f"{src}/config.json describes an invalid model: {e.problem}") from None


def load_tokenizer(src: Path) -> Tokenizer:
    """The SentencePiece tokenizer of a HF model directory.

    Raises:
        InputError: No tokenizer.model (with the reason when there is only a tokenizer.json), or one
            without llmctl's special tokens.
    """
    path = Path(src) / MODEL_FILE
    if not path.is_file():
        if (Path(src) / "tokenizer.json").is_file():
            raise InputError(
                f"{src} has a tokenizer.json but no {MODEL_FILE}: llmctl's tokenizer is "
                "SentencePiece-based and cannot use a byte-level BPE (tokenizers/tiktoken) vocabulary "
                "such as Llama 3's",
                "import a model with a SentencePiece tokenizer.model, e.g. one written by llmctl export",
            )
        raise InputError(f"{src} has no {MODEL_FILE}", "llmctl needs the SentencePiece model file")
    try:
        return Tokenizer.load(path)
    except LlmctlError as e:
        raise InputError(
            f"{path}: {e.problem}; llmctl's chat template and padding need them as SentencePiece "
            "control tokens",
            "only tokenizers made by llmctl (llmctl tokenize, or llmctl export) can be imported; "
            "adding tokens to a foreign model changes its vocabulary and needs fine-tuning",
        ) from None


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards a model.safetensors.index.json names.

    Raises:
        InputError: No safetensors weights (pickled weights are refused), or a corrupt file.
    """
    src = Path(src)
    if (src / SINGLE).is_file():
        files = [src / SINGLE]
    elif (src / INDEX).is_file():
        weight_map = _read_json(src / INDEX).get("weight_map") or {}
        files = [src / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise InputError(
                f"{src / INDEX} names shards that are missing: {', '.join(missing) or 'none listed'}"
            )
    else:
        pickled = sorted(p.name for p in src.glob("*.bin"))
        raise InputError(
            f"{src} has no {SINGLE} or {INDEX}"
            + (f" (found {', '.join(pickled)})" if pickled else ""),
            "llmctl reads safetensors only (it never unpickles); convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW, safe_serialization=True)",
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f), device="cpu"))
        except (SafetensorError, OSError) as e:
            raise InputError(
                f"{f} is corrupt or truncated ({e})", "re-download the model"
            ) from None
    return sd


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data
