"""Tests for llmctl.core.lora: adapters, merging, adapter-only state, config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmctl.core.checkpoint import load_checkpoint, save_checkpoint
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
)
from llmctl.core.model import ModelConfig, Transformer, preset
from llmctl.core.tokenizer import Tokenizer


def _cfg(**changes: object) -> ModelConfig:
    small = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64}
    return preset("tiny", vocab_size=64).replace(**{**small, **changes})


def _model(cfg: ModelConfig | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg or _cfg()).eval()


def _ids(seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B everywhere, so the adapters actually change the output."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def test_fresh_adapters_leave_logits_unchanged() -> None:
    model, ids = _model(), _ids()
    with torch.no_grad():
        before = model(ids)
    params = apply_lora(model, LoraConfig(rank=4), generator=_gen())
    with torch.no_grad():
        after = model(ids)
    assert torch.equal(before, after)
    # A then B for each of wqkv, wo, w13, w2 in both layers, in module order.
    assert len(params) == 2 * 4 * 2
    assert params[0] is model.layers[0].attn.wqkv.lora_a
    assert params[1] is model.layers[0].attn.wqkv.lora_b
    assert params[-1] is model.layers[1].mlp.w2.lora_b


def test_only_adapter_parameters_get_gradients() -> None:
    model = _model()
    params = apply_lora(model, LoraConfig(rank=4), generator=_gen())
    model.train()
    _randomize_b(model)  # otherwise only B gets a gradient on the first step
    ids = _ids()
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    lora_ids = {id(p) for p in params}
    for name, p in model.named_parameters():
        trained = id(p) in lora_ids
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
        if trained:
            assert p.grad.abs().sum() > 0, name


def test_a_few_steps_lower_the_loss_and_leave_the_base_alone() -> None:
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    params = apply_lora(model, LoraConfig(rank=4, alpha=8.0), generator=_gen())
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for k, v in merged_state_dict(model).items():
        if k.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight")):
            assert not torch.equal(v, base[k]), k  # the merged update is non-zero
        else:
            assert torch.equal(v, base[k]), k  # embeddings and norms untouched


def test_merge_gives_the_same_logits_and_a_plain_state_dict() -> None:
    model, ids = _model(), _ids()
    plain_keys = list(model.state_dict())
    apply_lora(model, LoraConfig(rank=4), generator=_gen())
    _randomize_b(model)
    with torch.no_grad():
        lora_logits = model(ids)
    assert merge_lora(model) is model
    with torch.no_grad():
        merged_logits = model(ids)
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)
    assert not torch.equal(merged_logits, _model()(ids))  # the adapters did something
    assert list(model.state_dict()) == plain_keys
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight  # the tie survives


def test_merged_model_round_trips_through_a_checkpoint(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    model = _model(_cfg(vocab_size=tokenizer.vocab_size))
    apply_lora(model, LoraConfig(rank=4), generator=_gen())
    _randomize_b(model)
    merge_lora(model)
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    ids = _ids(vocab=tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(path).model(ids), model(ids))


def test_merged_state_dict_matches_merge_without_mutating() -> None:
    model, ids = _model(), _ids()
    apply_lora(model, LoraConfig(rank=4), generator=_gen())
    _randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = merged_state_dict(model)
    # The model is unchanged: same modules, same keys, same values, still frozen.
    assert isinstance(model.layers[0].attn.wqkv, LoraLinear)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.embed.weight.requires_grad
    # The dict loads strictly into a plain model, which then computes what the adapted one does.
    plain = _model(seed=5)
    assert list(sd) == list(plain.state_dict())
    plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_lora_state_dict_round_trips() -> None:
    model, ids = _model(), _ids()
    apply_lora(model, LoraConfig(rank=4), generator=_gen(0))
    _randomize_b(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert "layers.0.attn.wqkv.lora_a" in sd
    assert all(k.endswith((".lora_a", ".lora_b")) for k in sd)
    assert sd["layers.1.mlp.w2.lora_b"].shape == (32, 4)
    other = _model()  # same base weights, different adapter init
    apply_lora(other, LoraConfig(rank=4), generator=_gen(1))
    load_lora_state_dict(other, sd)
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))


def test_load_lora_state_dict_names_mismatches() -> None:
    model = _model()
    apply_lora(model, LoraConfig(rank=4))
    sd = lora_state_dict(model)
    other_rank = _model()
    apply_lora(other_rank, LoraConfig(rank=2))
    with pytest.raises(InputError, match=r"layers\.0\.attn\.wqkv\.lora_a \(4, 32\) vs \(2, 32\)"):
        load_lora_state_dict(other_rank, sd)
    other_targets = _model()
    apply_lora(other_targets, LoraConfig(rank=4, targets=("wqkv", "wo")))
    with pytest.raises(InputError, match=r"unexpected 8 key\(s\): layers\.0\.mlp\.w13") as e:
        load_lora_state_dict(other_targets, sd)
    assert "--lora-targets" in (e.value.hint or "")
    partial = {k: v for k, v in sd.items() if "w2" not in k}
    with pytest.raises(InputError, match=r"missing 4 key\(s\): layers\.0\.mlp\.w2\.lora_a"):
        load_lora_state_dict(model, partial)


def test_tied_head_is_refused_untied_head_is_adapted() -> None:
    tied = _model()
    with pytest.raises(ConfigError, match="lm_head, whose weight is tied to embed.weight") as e:
        apply_lora(tied, LoraConfig(targets=("wo", "lm_head")))
    assert "--lora-targets" in (e.value.hint or "")
    assert not any(isinstance(m, LoraLinear) for m in tied.modules())  # refused before any change
    assert all(p.requires_grad for p in tied.parameters())
    untied = _model(_cfg(tie_embeddings=False))
    params = apply_lora(untied, LoraConfig(rank=2, targets=("lm_head",)))
    assert isinstance(untied.lm_head, LoraLinear)
    assert len(params) == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 0}, "--lora-rank must be >= 1, got 0"),
        ({"alpha": 0.0}, "--lora-alpha must be > 0"),
        ({"dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
        ({"targets": ()}, "--lora-targets must name at least one layer"),
        ({"targets": ("wqkv", "q_proj")}, "--lora-targets has unknown layer.*q_proj.*choose from"),
        ({"targets": ("wo", "wo")}, "--lora-targets names a layer twice"),
    ],
)
def test_bad_config_is_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**changes)


def test_config_defaults_and_list_targets() -> None:
    cfg = LoraConfig(targets=["wqkv", "w2"])  # e.g. from TOML
    assert cfg.targets == ("wqkv", "w2")
    assert isinstance(cfg.targets, tuple)
    assert LoraConfig().scale == 2.0
    assert LoraConfig().targets == ("wqkv", "wo", "w13", "w2")


def test_applying_twice_is_refused() -> None:
    model = _model()
    apply_lora(model, LoraConfig())
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoraConfig())


def test_count_trainable() -> None:
    cfg = _cfg()
    model = _model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_trainable(model) == (total, total)
    apply_lora(model, LoraConfig(rank=4))
    qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    d, f, r = cfg.d_model, cfg.d_ff, 4
    per_layer = r * (d + qkv_out) + r * (d + d) + r * (d + 2 * f) + r * (f + d)
    n_lora = cfg.n_layers * per_layer
    assert count_trainable(model) == (n_lora, total + n_lora)


def test_adapters_follow_the_base_dtype_and_device_moves() -> None:
    model = _model().to(torch.float64)  # apply after a move
    apply_lora(model, LoraConfig(rank=2))
    lora = model.layers[0].mlp.w13
    assert lora.lora_a.dtype == lora.lora_b.dtype == torch.float64
    model = _model()
    apply_lora(model, LoraConfig(rank=2))
    model.to(torch.bfloat16)  # move after applying: adapters are ordinary parameters
    assert model.layers[0].mlp.w13.lora_b.dtype == torch.bfloat16
    merge_lora(model)
    assert model.layers[0].mlp.w13.weight.dtype == torch.bfloat16


def test_seeded_init_and_kaiming_bound() -> None:
    a, b = _model(), _model()
    apply_lora(a, LoraConfig(rank=4), generator=_gen(3))
    apply_lora(b, LoraConfig(rank=4), generator=_gen(3))
    assert all(
        torch.equal(x, y)
        for x, y in zip(lora_state_dict(a).values(), lora_state_dict(b).values(), strict=True)
    )
    w2 = a.layers[0].mlp.w2  # in_features = d_ff = 64: U(-1/8, 1/8)
    assert w2.lora_a.abs().max() <= 1 / 8
    assert w2.lora_a.std() > 0.05
    assert torch.count_nonzero(w2.lora_b) == 0


def test_dropout_only_touches_the_adapter_path() -> None:
    model, ids = _model(), _ids()
    apply_lora(model, LoraConfig(rank=4, dropout=0.5), generator=_gen())
    _randomize_b(model)
    with torch.no_grad():
        eval_out = model(ids)
        model.train()
        torch.manual_seed(0)
        train_a = model(ids)
        torch.manual_seed(1)
        train_b = model(ids)
        model.eval()
        assert torch.equal(model(ids), eval_out)
    assert not torch.equal(train_a, train_b)
