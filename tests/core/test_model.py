"""Tests for llmctl.core.model (and the HF mapping in llmctl.core.hf_compat)."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.errors import ConfigError
from llmctl.core.hf_compat import from_hf_state_dict, to_hf_config, to_hf_state_dict
from llmctl.core.model import (
    PRESETS,
    ModelConfig,
    Transformer,
    apply_rope,
    param_count,
    preset,
    rope_tables,
)


def _cfg(**changes: object) -> ModelConfig:
    base = {
        "vocab_size": 256,
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 64,
        "max_seq_len": 64,
    }
    return ModelConfig(**{**base, **changes})


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the init: norm gains off 1 (so a swapped norm shows) and logits O(1)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim == 1:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    _randomize(m, seed)
    return m


def _ids(cfg: ModelConfig, b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


# -- Hugging Face parity ---------------------------------------------------------------------------


def _hf_model(cfg: ModelConfig, attn: str = "eager", **overrides: object) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        **{**to_hf_config(cfg), **overrides}, attn_implementation=attn
    )
    torch.manual_seed(123)
    return transformers.LlamaForCausalLM(hf_cfg).eval()


PARITY_CASES = {
    "gqa": _cfg(n_heads=4, n_kv_heads=2),
    "mha": _cfg(n_heads=4, n_kv_heads=4),
    "mqa": _cfg(n_heads=4, n_kv_heads=1),
    "rope_theta_500k": _cfg(rope_theta=500000.0),
    "untied": _cfg(tie_embeddings=False),
    "tied": _cfg(tie_embeddings=True, n_kv_heads=1, norm_eps=1e-6),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_hf_llama(case: str, attn: str) -> None:
    cfg = PARITY_CASES[case]
    ours = _model(cfg)
    hf = _hf_model(cfg, attn)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert unexpected == []
    # A tied HF model re-ties lm_head to embed_tokens; nothing else may be left uninitialised.
    assert missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = _ids(cfg, 2, 24)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32
    assert expected.abs().max() > 0.5  # logits large enough for 1e-4 to be a real test
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_hf_parity_detects_a_wrong_rope_theta() -> None:
    """Negative control: the parity test is sensitive to the RoPE base at this length."""
    cfg = _cfg(rope_theta=500000.0)
    ours = _model(cfg)
    wrong = {
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    hf = _hf_model(cfg, **wrong)
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    ids = _ids(cfg, 1, 24)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_hf_state_dict_round_trip(tied: bool) -> None:
    cfg = _cfg(tie_embeddings=tied)
    ours = _model(cfg)
    hf_sd = {k: v.clone() for k, v in to_hf_state_dict(ours).items()}
    assert ("lm_head.weight" in hf_sd) is not tied
    back = from_hf_state_dict(hf_sd, cfg)
    want = ours.state_dict()
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


def test_hf_weights_import_into_our_model() -> None:
    """The import direction: random HF weights loaded into ours give HF's logits."""
    cfg = _cfg(n_kv_heads=1, tie_embeddings=False)
    hf = _hf_model(cfg)
    _randomize(hf, 7)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    ids = _ids(cfg, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_from_hf_state_dict_names_a_missing_tensor() -> None:
    from llmctl.core.errors import InputError

    cfg = _cfg()
    sd = to_hf_state_dict(_model(cfg))
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(InputError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf_state_dict(sd, cfg)


def test_hf_compat_does_not_import_transformers_at_module_level() -> None:
    """transformers is a test-only dependency: hf_compat must import without it."""
    import ast
    import inspect

    import llmctl.core.hf_compat as hf_compat

    tree = ast.parse(inspect.getsource(hf_compat))
    top_level = set()
    for node in tree.body:  # module level only; a lazy import inside a function is fine
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert "transformers" not in top_level
    assert top_level <= {"__future__", "typing", "torch", "llmctl"}


# -- shapes and causality -------------------------------------------------------------------------


def test_output_shapes() -> None:
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 3, 10)
    with torch.no_grad():
        assert m(ids).shape == (3, 10, cfg.vocab_size)
        assert m(ids, hidden=True).shape == (3, 10, cfg.d_model)


def test_sequence_longer_than_context_is_refused() -> None:
    cfg = _cfg(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        _model(cfg)(_ids(cfg, 1, 9))


def test_causality() -> None:
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 1, 16)
    t = 9
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = m(ids), m(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    per_pos = (a - b).abs().amax(dim=-1)[0]
    assert bool((per_pos[t:] > 1e-4).all()), per_pos


# -- attention against a hand-written reference ----------------------------------------------------


def _reference_attention(attn: torch.nn.Module, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Textbook causal attention: explicit scores, mask and softmax; query head h reads K/V head
    h // (n_heads / n_kv_heads) by indexing (nothing repeated)."""
    B, T, _ = x.shape
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w = attn.wqkv.weight
    q = (x @ w[: H * hd].T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ w[H * hd : (H + KV) * hd].T).view(B, T, KV, hd).transpose(1, 2)
    v = (x @ w[(H + KV) * hd :].T).view(B, T, KV, hd).transpose(1, 2)
    cos, sin = rope_tables(cfg)
    q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(H):
        kv = h // (H // KV)
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(future, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])  # (B, T, hd)
    y = torch.stack(heads, dim=2).reshape(B, T, H * hd)
    return y @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_equals_reference(n_kv_heads: int) -> None:
    cfg = _cfg(n_heads=4, n_kv_heads=n_kv_heads)
    attn = _model(cfg).layers[0].attn
    x = torch.randn(2, 12, cfg.d_model, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_tables(cfg)
    with torch.no_grad():
        got = attn(x, cos[:12], sin[:12], None, 0, None)
        want = _reference_attention(attn, x, cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# -- KV cache ---------------------------------------------------------------------------------------


def test_kv_cache_token_by_token_matches_full_forward() -> None:
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 2, 20)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2)
        steps = [m(ids[:, :8], cache=cache)]
        steps += [m(ids[:, t : t + 1], cache=cache) for t in range(8, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_chunked_prefill_with_explicit_mask() -> None:
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 2, 20)
    t1 = 7
    t2 = ids.shape[1] - t1
    # Query i of the second chunk sits at position t1 + i and may see keys 0 .. t1 + i.
    mask = torch.ones(t2, t1 + t2, dtype=torch.bool).tril(diagonal=t1)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        a = m(ids[:, :t1], cache=cache)
        b = m(ids[:, t1:], cache=cache, attn_mask=mask.expand(2, 1, t2, t1 + t2))
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_chunked_prefill_default_is_causal() -> None:
    """Without a mask, a chunk fed after a filled cache is still causal (the documented default)."""
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 2, 20)
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2)
        chunks = [
            m(ids[:, :5], cache=cache),
            m(ids[:, 5:13], cache=cache),
            m(ids[:, 13:], cache=cache),
        ]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_explicit_positions_equal_default_positions() -> None:
    cfg = _cfg()
    m = _model(cfg)
    ids = _ids(cfg, 1, 10)
    with torch.no_grad():
        full = m(ids, positions=torch.arange(10)[None])
        plain = m(ids)
    torch.testing.assert_close(full, plain, atol=1e-6, rtol=0)


# -- RoPE -------------------------------------------------------------------------------------------


def test_rope_depends_only_on_relative_position() -> None:
    cfg = _cfg(max_seq_len=256, d_model=64, n_heads=2, n_kv_heads=2)
    cos, sin = rope_tables(cfg)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, cfg.head_dim, generator=g)
    k = torch.randn(1, 1, 1, cfg.head_dim, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    for m, n, s in [(3, 1, 50), (10, 10, 100), (0, 7, 200), (30, 2, 31)]:
        assert score(m + s, n + s) == pytest.approx(score(m, n), abs=1e-4)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # but it does depend on the offset


def test_rope_preserves_norm() -> None:
    cfg = _cfg()
    cos, sin = rope_tables(cfg)
    x = torch.randn(2, 4, cfg.max_seq_len, cfg.head_dim, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


# -- sizes and presets ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_param_count_matches_numel(tied: bool, n_kv_heads: int) -> None:
    cfg = _cfg(tie_embeddings=tied, n_kv_heads=n_kv_heads)
    m = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in m.parameters())
    non_embed = sum(p.numel() for n, p in m.named_parameters() if n != "embed.weight")
    assert param_count(cfg, embeddings=False) == non_embed


def test_tied_head_shares_the_embedding() -> None:
    m = Transformer(_cfg(tie_embeddings=True))
    assert m.lm_head.weight is m.embed.weight
    u = Transformer(_cfg(tie_embeddings=False))
    assert u.lm_head.weight is not u.embed.weight


@pytest.mark.parametrize(
    ("name", "expected"), [("124m", 124e6), ("350m", 350e6), ("1b", 1.0e9), ("7b", 6.7e9)]
)
def test_preset_param_counts_near_their_names(name: str, expected: float) -> None:
    cfg = preset(name, vocab_size=32000)
    assert param_count(cfg) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "7b"])
def test_presets_build_and_count_matches_numel(name: str) -> None:
    cfg = preset(name, vocab_size=32000)
    with torch.device("meta"):  # shapes only: no memory, no init work
        m = Transformer(cfg)
    assert param_count(cfg) == sum(p.numel() for p in m.parameters())


def test_all_presets_build_configs() -> None:
    for name in PRESETS:
        cfg = preset(name, vocab_size=32000)
        assert cfg.d_model % cfg.n_heads == 0
        assert cfg.n_heads % cfg.n_kv_heads == 0


def test_preset_overrides_and_unknown_name() -> None:
    assert preset("tiny", vocab_size=300, max_seq_len=128).max_seq_len == 128
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        preset("huge")


# -- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"d_model": 36, "n_heads": 4}, r"head_dim \(9\) must be even"),
        ({"n_layers": 0}, r"n_layers must be >= 1, got 0"),
        ({"rope_theta": 0.0}, r"rope_theta must be > 0"),
        ({"max_seq_len": 1}, r"max_seq_len must be >= 2"),
    ],
)
def test_model_config_validation(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(**changes)


def test_model_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = _cfg(rope_theta=500000.0, tie_embeddings=False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config keys: hidden_size"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden_size": 32})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        cfg.replace(n_kv_heads=3)


def test_rope_gradient_is_the_textbook_one() -> None:
    """apply_rope's hand-written backward (the inverse rotation) equals autograd of the formula."""
    cfg = _cfg()
    cos, sin = rope_tables(cfg)
    cos, sin = cos.double(), sin.double()
    x = torch.randn(2, 3, cfg.max_seq_len, cfg.head_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))
    half = cfg.head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin), x * cos + rotated * sin)


def test_one_token_decoding_fast_path_equals_the_general_forward() -> None:
    """(B, 1) ids with a cache take `_decode_one`; explicit positions take the general path: the
    hidden states, logits and cache contents are the same, bit for bit at batch 1 (the same ops);
    at batch 2 the projections take `_decode_linear`'s `(w @ x.T).T`, equal to float rounding."""
    cfg = _cfg(n_kv_heads=2)
    model = _model(cfg).eval()
    for b in (1, 2):
        ids = _ids(cfg, b, 9)
        same = torch.equal if b == 1 else _close
        with torch.no_grad():
            fast, slow = model.new_cache(b, 16), model.new_cache(b, 16)
            model(ids[:, :6], cache=fast)
            model(ids[:, :6], cache=slow)
            for t in range(6, 9):
                pos = torch.full((b, 1), t)
                a = model(ids[:, t : t + 1], cache=fast)
                c = model(ids[:, t : t + 1], cache=slow, positions=pos)
                assert same(a, c)
        assert fast.pos == slow.pos == 9
        assert all(same(x, y) for x, y in zip(fast.k + fast.v, slow.k + slow.v, strict=True))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_inference_layout_keeps_every_value_and_the_greedy_tokens(tied: bool) -> None:
    """`inference_layout` stores the block matrices transposed and copies the head for one-row
    decoding: the state dict is equal bit for bit (and saves contiguous), logits agree to float
    rounding at batch 1 and 3 and in a whole-sequence forward, and greedy decoding is unchanged."""
    from llmctl.core.checkpoint import model_state
    from llmctl.core.sampling import SamplingConfig, generate

    cfg = _cfg(tie_embeddings=tied)
    ref, fast = _model(cfg), _model(cfg)
    fast.inference_layout()
    wqkv = fast.layers[0].attn.wqkv.weight
    assert wqkv.shape == ref.layers[0].attn.wqkv.weight.shape
    assert wqkv.stride() == (1, wqkv.shape[0])  # a view of the contiguous (in, out) matrix
    assert fast._head_copy(fast.lm_head.weight) is not None
    sd_ref, sd_fast = model_state(ref), model_state(fast)
    assert sd_ref.keys() == sd_fast.keys()
    assert all(torch.equal(sd_ref[k], v) and v.is_contiguous() for k, v in sd_fast.items())
    ids = _ids(cfg, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), ref(ids), rtol=0, atol=1e-5)
        for b in (1, 3):
            ca, cb = ref.new_cache(b, 32), fast.new_cache(b, 32)
            ref(ids[:b, :8], cache=ca)
            fast(ids[:b, :8], cache=cb)
            ha, hb = (
                ref(ids[:b, 8:9], cache=ca, hidden=True),
                fast(ids[:b, 8:9], cache=cb, hidden=True),
            )
            torch.testing.assert_close(hb, ha, rtol=0, atol=1e-5)
            torch.testing.assert_close(fast.logits(hb), ref.logits(ha), rtol=0, atol=1e-5)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    prompts = _ids(cfg, 2, 5).tolist()
    assert generate(fast, prompts, greedy) == generate(ref, prompts, greedy)
    assert generate(fast, prompts[:1], greedy) == generate(ref, prompts[:1], greedy)


def test_inference_layout_head_copy_retires_when_the_weights_change() -> None:
    """An in-place update of the head (an optimizer step, load_state_dict) bumps its version: the
    one-row logits then come from the new weights, never from the stale copy."""
    cfg = _cfg()
    model = _model(cfg).inference_layout()
    h = torch.randn(1, 1, cfg.d_model)
    with torch.no_grad():
        before = model.logits(h)
        model.lm_head.weight.mul_(2.0)
        assert model._head_copy(model.lm_head.weight) is None
        torch.testing.assert_close(model.logits(h), 2.0 * before, rtol=1e-5, atol=1e-5)
    model.load_state_dict(_model(cfg, seed=3).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            model.logits(h), _model(cfg, seed=3).logits(h), rtol=0, atol=1e-5
        )


def test_rmsnorm_hand_written_backward_equals_autograd() -> None:
    """Training on CPU takes `_RMSNormFn`: output and both gradients equal autograd through
    `F.rms_norm` (fp32, to rounding), and gradcheck passes in float64."""
    from llmctl.core.model import RMSNorm, _RMSNormFn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
    up = torch.randn(3, 5, 16, generator=g)
    out = norm(x)
    assert out.grad_fn is not None
    assert "RMSNormFn" in type(out.grad_fn).__name__
    out.backward(up)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ref = torch.nn.functional.rms_norm(x, (16,), norm.weight, 1e-5)
    ref.backward(up)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw, norm.weight.grad, rtol=0, atol=1e-5)
    x64 = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w64 = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-5), (x64, w64))


def test_inference_layout_head_copy_is_dropped_by_train_and_conversions() -> None:
    """`train()`, `.to(dtype)` and a new storage for the head drop the copy: the one-row logits
    follow the weights (no stale values, no dtype mismatch)."""
    cfg = _cfg()
    model = _model(cfg).inference_layout()
    h = torch.randn(1, 1, cfg.d_model)
    model.train()
    assert model._head_t is None
    model.eval().inference_layout()
    model.to(torch.float64)
    assert model._head_t is None
    with torch.no_grad():
        torch.testing.assert_close(
            model.logits(h.double()), model.lm_head(h.double()), rtol=0, atol=1e-9
        )
    model.to(torch.float32).inference_layout()
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data * 3.0  # new storage, same version
        torch.testing.assert_close(model.logits(h), model.lm_head(h), rtol=0, atol=1e-5)
