"""core/sizing.py against numbers worked out by hand."""

from __future__ import annotations

import pytest

from llmctl.core import sizing
from llmctl.core.errors import ConfigError
from llmctl.core.model import ModelConfig, param_count, preset

# d_model 64, 2 layers, 4 heads of 16, 2 KV heads (kv_dim 32), d_ff 128.
SMALL = ModelConfig(vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


def test_parameters_and_flops_of_the_presets() -> None:
    # 124m: attention 768 x (12 + 2 x 12) x 64 + 12 x 64 x 768 = 2,359,296; MLP 3 x 768 x 2560 =
    # 5,898,240; norms 1,536 -> block 8,259,072; x 12 + final norm 768 + embedding 32000 x 768.
    e = sizing.estimate(preset("124m", vocab_size=32000), tokens=10**9, seq_len=1024, micro_batch=8)
    assert e.params == 12 * 8_259_072 + 768 + 32_000 * 768 == 123_685_632
    # 7b (untied): block 4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096 = 202,383,360.
    non_emb = 32 * 202_383_360 + 4096 + 32_000 * 4096  # the untied head counts: 6,607,343,616
    e = sizing.estimate(
        preset("7b", vocab_size=32000),
        tokens=10**12,
        seq_len=4096,
        micro_batch=1,
        gpus=1024,
        gpu="h100",
        mfu=0.5,
    )
    assert e.params_non_embedding == non_emb
    assert e.flops_per_token == 6 * non_emb + 12 * 32 * 4096 * 4096 == 46_086_512_640
    assert e.flops == pytest.approx(46_086_512_640e12)
    assert e.seconds == pytest.approx(46_086_512_640e12 / (1024 * 989e12 * 0.5))  # ~25.3 h
    assert e.gpu_hours == pytest.approx(e.seconds * 1024 / 3600)


def test_activations_by_hand() -> None:
    # per token per layer: 7 x 64 + 4 x 32 + 4 x 128 = 1088 elements of 2 bytes.
    per_layer = 2 * 10 * 2 * 1088  # B=2, T=10
    assert sizing.activation_bytes(SMALL, micro_batch=2, seq_len=10) == 2 * per_layer
    assert sizing.activation_bytes(SMALL, micro_batch=2, seq_len=10, act_bytes=4) == 4 * per_layer
    # checkpointed: the 2 layer inputs (2 x 10 x 64 x 2 bytes each) plus one layer recomputed.
    ckpt = sizing.activation_bytes(SMALL, micro_batch=2, seq_len=10, checkpointing=True)
    assert ckpt == 2 * (2 * 10 * 64 * 2) + per_layer
    # TP over 2: the norms' 4 x 64 whole, the other 3 x 64 + 4 x 32 + 4 x 128 = 832 halved.
    tp2 = 2 * 10 * 2 * (4 * 64 + 832 / 2)
    assert sizing.activation_bytes(SMALL, micro_batch=2, seq_len=10, tp=2) == 2 * tp2


def test_memory_per_strategy() -> None:
    cfg = SMALL
    n_params = param_count(cfg)
    kw = {"gpus": 8, "micro_batch": 1, "seq_len": 1}
    ddp = sizing.memory(cfg, "ddp", **kw)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * n_params, 4 * n_params, 8 * n_params)
    z1 = sizing.memory(cfg, "zero1", **kw)
    assert (z1.weights, z1.gradients, z1.optimizer) == (4 * n_params, 4 * n_params, n_params)
    z2 = sizing.memory(cfg, "zero2", **kw)
    assert (z2.gradients, z2.optimizer) == (n_params / 2, n_params)
    fsdp = sizing.memory(cfg, "fsdp", **kw)
    block = sizing.block_params(cfg)  # one block gathered: its weights and gradients
    assert fsdp.weights == pytest.approx(4 * n_params / 8 + 4 * block)
    assert fsdp.gradients == pytest.approx(4 * n_params / 8 + 4 * block)
    assert fsdp.optimizer == n_params
    assert ddp.total > z1.total > z2.total
    # 16 bytes per parameter under DDP: a 7B model needs ~100 GiB before activations.
    seven = preset("7b", vocab_size=32000)
    assert sizing.memory(seven, "ddp", **kw).total - sizing.activation_bytes(
        seven, micro_batch=1, seq_len=1
    ) == 16 * param_count(seven)


def test_tp_row_and_fit() -> None:
    seven = preset("7b", vocab_size=32000)
    e = sizing.estimate(seven, tokens=10**9, seq_len=4096, micro_batch=1, gpus=64, tp=8)
    assert list(e.memory) == ["ddp", "zero1", "zero2", "fsdp", "fsdp+tp"]
    assert not e.fits("ddp")  # 16 bytes x 6.7B = 108 GB > 80 GB
    assert e.fits("fsdp")
    tp = e.memory["fsdp+tp"]
    # 7b: per layer 4 x 4096 whole, (3 x 4096 + 4 x 4096 + 4 x 11008) / 8 split
    whole, split = 4 * 4096, 3 * 4096 + 4 * 4096 + 4 * 11008
    assert tp.activations == pytest.approx(
        e.memory["fsdp"].activations * (whole + split / 8) / (whole + split)
    )
    assert "fsdp+tp" not in sizing.estimate(seven, tokens=1, seq_len=8, micro_batch=1).memory


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"gpu": "tpu"}, "unknown --gpu"),
        ({"mfu": 1.5}, "--mfu"),
        ({"gpus": 6, "tp": 4}, "must divide"),
    ],
)
def test_bad_settings(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sizing.estimate(SMALL, tokens=1, seq_len=8, micro_batch=1, **kw)
