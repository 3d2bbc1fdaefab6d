"""core/parallel.py in one process: the unfused (tensor-parallel) layout and its state-dict
conversions, activation checkpointing and the gradient-norm clip. The multi-process cases are in
tests/stages/test_distributed.py."""

from __future__ import annotations

import copy

import pytest
import torch

from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.optim import make_adamw
from llmctl.core.parallel import (
    _split_state,
    build_on_meta,
    checkpoint_activations,
    clip_grad_norm,
    full_model_state,
    full_optimizer_state,
    fuse_state,
    load_optimizer_state,
    materialize,
    unfuse,
)

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)


def model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG)


def step(m: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    ids = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))
    loss = m(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def test_the_unfused_model_computes_the_same_and_fuses_back() -> None:
    fused, split = model(), model()
    unfuse(split)
    assert "wqkv" not in split.layers[0].attn._modules
    names = [n for n, _ in split.layers[0].named_parameters()]
    assert names[:4] == ["attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight"]
    assert names[5:8] == ["mlp_norm.weight", "mlp.w1.weight", "mlp.w3.weight"]
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    assert torch.allclose(fused(ids), split(ids), atol=1e-6)
    a, b = full_model_state(fused), full_model_state(split)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_state_moves_between_the_fused_and_unfused_layouts() -> None:
    """A TP run's one-file optimizer state is in the fused order: it resumes without TP, and a
    fused one resumes with TP; the moments (elementwise) are cut and joined exactly."""
    fused, split = model(), model()
    unfuse(split)
    opt_f = make_adamw(fused, 1e-2, 0.1, (0.9, 0.95))
    opt_s = make_adamw(split, 1e-2, 0.1, (0.9, 0.95))
    for s in range(2):
        assert abs(step(fused, opt_f, s) - step(split, opt_s, s)) < 1e-5
    saved_f, saved_s = full_optimizer_state(fused, opt_f), full_optimizer_state(split, opt_s)
    assert [len(g["params"]) for g in saved_s["param_groups"]] == [
        len(g["params"]) for g in saved_f["param_groups"]
    ]
    for i, st in saved_f["state"].items():
        assert torch.allclose(st["exp_avg_sq"], saved_s["state"][i]["exp_avg_sq"], atol=1e-8)
    # Cross-load: each continues as the other would have.
    fused2, split2 = copy.deepcopy(fused), copy.deepcopy(split)
    opt_f2 = make_adamw(fused2, 1e-2, 0.1, (0.9, 0.95))
    opt_s2 = make_adamw(split2, 1e-2, 0.1, (0.9, 0.95))
    load_optimizer_state(fused2, opt_f2, saved_s)
    load_optimizer_state(split2, opt_s2, saved_f)
    ref = step(fused, opt_f, 7)
    assert abs(step(fused2, opt_f2, 7) - ref) < 1e-5
    assert abs(step(split2, opt_s2, 7) - ref) < 1e-5


def test_fuse_state_leaves_a_fused_state_alone() -> None:
    sd = model().state_dict()
    assert fuse_state(sd) is sd


def test_activation_checkpointing_changes_memory_not_results() -> None:
    plain, ckpt = model(), model()
    checkpoint_activations(ckpt)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    for m in (plain, ckpt):
        m(ids[:, :-1], targets=ids[:, 1:]).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    with torch.no_grad():  # decoding runs the plain forward
        assert torch.equal(plain(ids), ckpt(ids))


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])
def test_clip_grad_norm_equals_torchs(max_norm: float) -> None:
    a, b = model(), model()
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    for m in (a, b):
        m(ids[:, :-1], targets=ids[:, 1:]).backward()
    ref = torch.nn.utils.clip_grad_norm_(list(a.parameters()), max_norm)
    assert abs(clip_grad_norm(list(b.parameters()), max_norm) - float(ref)) < 1e-6
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_a_meta_model_materialises_to_the_seeds_weights(tie: bool, split: bool) -> None:
    cfg = CFG.replace(tie_embeddings=tie)
    whole = Transformer(cfg)
    whole.init_weights(torch.Generator().manual_seed(3))
    meta = build_on_meta(cfg)
    assert all(p.is_meta for p in meta.parameters())
    if split:  # the tensor-parallel layout: values arrive fused and are split by rows
        unfuse(meta)
    materialize(meta, torch.device("cpu"), seed=3)
    assert (meta.lm_head.weight is meta.embed.weight) == tie
    assert torch.equal(meta.rope_cos, whole.rope_cos)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(meta(ids), whole(ids))
    got = fuse_state(meta.state_dict())
    want = whole.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_meta_model_materialises_from_a_state_dict() -> None:
    src = model(5)
    meta = build_on_meta(CFG)
    materialize(meta, torch.device("cpu"), state=src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(meta.parameters(), src.parameters(), strict=True))
    partial = {k: v for k, v in src.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="no values for norm.weight"):
        materialize(build_on_meta(CFG), torch.device("cpu"), state=partial)
    extra = {**src.state_dict(), "layers.9.mlp.w2.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"layers\.9\.mlp\.w2\.weight is not a parameter"):
        materialize(build_on_meta(CFG), torch.device("cpu"), state=extra)
    bad = {**src.state_dict(), "norm.weight": torch.ones(CFG.d_model + 1)}
    with pytest.raises(ValueError, match=r"norm\.weight has shape \(33,\), the model's is \(32,\)"):
        materialize(build_on_meta(CFG), torch.device("cpu"), state=bad)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_pipeline_stage_materialises_only_its_own_parameters(tie: bool, index: int) -> None:
    from llmctl.core.pipeline import Stage

    cfg = CFG.replace(tie_embeddings=tie, n_layers=3)
    whole = Transformer(cfg)
    whole.init_weights(torch.Generator().manual_seed(4))
    meta = build_on_meta(cfg)
    stage = Stage(meta, index, 3)
    for state in (None, whole.state_dict()):  # the seed's values, or a checkpoint's
        materialize(stage, torch.device("cpu"), seed=4, state=state, partial=True)
        got = dict(stage.named_parameters())
        assert {n.split(".")[1] for n in got if n.startswith("layers.")} == {str(index)}
        assert ("embed.weight" in got) == (index == 0)
        assert ("lm_head.weight" in got) == (index == 2)
        for name, p in got.items():  # a last stage's tied head holds the embedding's values
            want = (
                whole.embed.weight
                if name == "lm_head.weight" and tie
                else whole.get_parameter(name)
            )
            assert torch.equal(p, want), name
    assert meta.layers[(index + 1) % 3].attn.wqkv.weight.is_meta  # other stages': never allocated
    extra = {**whole.state_dict(), "layers.7.mlp.w2.weight": torch.zeros(3)}
    other = Stage(build_on_meta(cfg), index, 3)
    with pytest.raises(ValueError, match=r"layers\.7\.mlp\.w2\.weight is not a parameter"):
        materialize(other, torch.device("cpu"), state=extra, partial=True)
    # Every stage checks every tensor, its own or not, so a bad checkpoint stops all ranks alike.
    name = "layers.1.mlp.w2.weight" if index != 1 else "layers.0.mlp.w2.weight"
    lacking = {k: v for k, v in whole.state_dict().items() if k != name}
    with pytest.raises(ValueError, match=f"no values for {name}"):
        materialize(
            Stage(build_on_meta(cfg), index, 3), torch.device("cpu"), state=lacking, partial=True
        )
    wrong = {**whole.state_dict(), name: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 3\)"):
        materialize(
            Stage(build_on_meta(cfg), index, 3), torch.device("cpu"), state=wrong, partial=True
        )


def test_materialize_checks_fused_rows_and_the_tied_head() -> None:
    src = model(5)
    sd = src.state_dict()
    split = build_on_meta(CFG)
    unfuse(split)
    longer = {
        **sd,
        "layers.0.attn.wqkv.weight": torch.zeros(
            sd["layers.0.attn.wqkv.weight"].shape[0] + 4, CFG.d_model
        ),
    }
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wqkv\.weight has \d+ rows"):
        materialize(split, torch.device("cpu"), state=longer)
    tied_cfg = CFG.replace(tie_embeddings=True)
    tied = Transformer(tied_cfg).state_dict()
    stray = {**tied, "lm_head.weight": torch.zeros_like(tied["embed.weight"])}
    meta = build_on_meta(tied_cfg)
    materialize(meta, torch.device("cpu"), state=stray)  # the stray head is ignored
    assert torch.equal(meta.embed.weight, tied["embed.weight"])
    only_head = {k: v for k, v in tied.items() if k != "embed.weight"}
    with pytest.raises(ValueError, match="no values for embed.weight"):
        materialize(build_on_meta(tied_cfg), torch.device("cpu"), state=only_head)


def test_split_optimizer_state_does_not_share_the_step() -> None:
    m = model(0)
    unfuse(m)
    rows = sum(p.shape[0] for n, p in m.named_parameters() if n.startswith("layers.0.attn.w"))
    rows -= m.layers[0].attn.wo.weight.shape[0]  # wq + wk + wv
    step = torch.tensor(3.0)
    fused = {"layers.0.attn.wqkv.weight": {"exp_avg": torch.zeros(rows, CFG.d_model), "step": step}}
    steps = [v["step"] for v in _split_state(fused, m).values()]
    assert len({id(t) for t in steps}) == 3  # each part advances its own
    assert all(float(t) == 3.0 for t in steps)
