"""Tests for llmctl.core.checkpoint: lossless save/load, exact resume, and named failures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from llmctl.core.artifacts import Manifest
from llmctl.core.checkpoint import (
    CONFIG,
    SHARDS,
    STATE_JSON,
    STATE_TENSORS,
    WEIGHTS,
    checkpoint_errors,
    iter_shard_weights,
    iter_weights,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.optim import make_adamw
from llmctl.core.tokenizer import MODEL_FILE, Tokenizer


def _cfg(tokenizer: Tokenizer, **changes: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=32,
        **changes,
    )


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _ids(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("def f(x):\n    return x + 1\n", bos=True)[:32]])


@pytest.fixture
def saved(tmp_path: Path, tokenizer: Tokenizer) -> tuple[Path, Transformer]:
    model = _model(_cfg(tokenizer))
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer), model


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(
    tmp_path: Path, tokenizer: Tokenizer, tied: bool
) -> None:
    model = _model(_cfg(tokenizer, tie_embeddings=tied, rope_theta=50000.0))
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == model.cfg
    assert ckpt.tokenizer.fingerprint == tokenizer.fingerprint
    assert not ckpt.model.training
    assert (ckpt.model.lm_head.weight is ckpt.model.embed.weight) is tied
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(ckpt.model(ids), model(ids))
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [CONFIG, MODEL_FILE, WEIGHTS, "manifest.json"]
    )
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary directory left behind


def test_manifest_records_kind_and_tokenizer(
    saved: tuple[Path, Transformer], tokenizer: Tokenizer
) -> None:
    path, _ = saved
    m = Manifest.read(path)
    assert m.kind == "checkpoint"
    assert m.tokenizer == {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}
    assert len(m.fingerprint) == 64


def test_save_over_an_existing_checkpoint(
    saved: tuple[Path, Transformer], tokenizer: Tokenizer
) -> None:
    path, _ = saved
    newer = _model(_cfg(tokenizer), seed=1)
    save_checkpoint(path, newer, tokenizer)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).model(ids), newer(ids))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("keep", [0, 8, 1000, -1])
def test_truncated_weights(saved: tuple[Path, Transformer], keep: int) -> None:
    path, _ = saved
    weights = path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(InputError, match=r"model\.safetensors is corrupt or truncated"):
        load_checkpoint(path)


def test_iter_weights_reads_one_tensor_at_a_time(saved: tuple[Path, Transformer]) -> None:
    path, model = saved
    want = load_checkpoint(path).model.state_dict()
    got = dict(iter_weights(path))
    assert set(got) <= set(want)  # a tied head is stored once
    assert all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize("keep", [0, 8, -1])
def test_iter_weights_truncated(saved: tuple[Path, Transformer], keep: int) -> None:
    path, _ = saved
    weights = path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(InputError, match=r"model\.safetensors is corrupt or truncated"):
        dict(iter_weights(path))


def _as_shards(path: Path, unfused: bool = False, drop: str = "") -> Path:
    """Turn one-file checkpoint `path` into a sharded one: its weights as DCP shards (one
    process), in the tensor-parallel layout's names when `unfused`, without tensor `drop`."""
    import torch.distributed.checkpoint as dcp

    from llmctl.core.parallel import unfuse

    model = load_checkpoint(path).model
    if unfused:
        unfuse(model)
    sd = {k: v for k, v in model.state_dict().items() if k != drop}
    with warnings.catch_warnings():  # "... assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": sd}, checkpoint_id=str(path / SHARDS), no_dist=True)
    (path / WEIGHTS).unlink()
    return path


@pytest.mark.parametrize("unfused", [False, True])
def test_iter_shard_weights_reads_fused_tensors_from_either_layout(
    saved: tuple[Path, Transformer], unfused: bool
) -> None:
    path, model = saved
    want = model.state_dict()
    _as_shards(path, unfused)
    with pytest.raises(InputError, match="sharded checkpoint: its torch.distributed"):
        iter_shard_weights(path)  # DCP's metadata is a pickle: refused before anything is read
    got = dict(iter_shard_weights(path, trust_shards=True))
    assert set(got) == set(want) - {"lm_head.weight"} or set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_iter_shard_weights_names_what_is_wrong(saved: tuple[Path, Transformer]) -> None:
    path, _ = saved
    _as_shards(path, unfused=True, drop="layers.1.attn.wk.weight")
    with pytest.raises(InputError, match=r"holds no layers\.1\.attn\.wk\.weight"):
        dict(iter_shard_weights(path, trust_shards=True))
    for f in (path / SHARDS).glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(InputError, match="corrupt or truncated"):
        dict(iter_shard_weights(path, trust_shards=True))
    with pytest.raises(InputError, match="shards is corrupt or truncated"):
        load_checkpoint(path, trust_shards=True)  # read whole: the same one line
    (path / SHARDS / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="not readable DCP shards"):
        iter_shard_weights(path, trust_shards=True)


def test_a_checkpoint_that_does_not_fit_the_model_is_an_input_error(
    saved: tuple[Path, Transformer],
) -> None:
    from llmctl.core.parallel import build_on_meta, materialize

    path, model = saved
    meta = build_on_meta(model.cfg.replace(d_ff=model.cfg.d_ff + 8))
    want = r"model\.safetensors does not match its config\.json"
    with pytest.raises(InputError, match=want), checkpoint_errors(path):
        materialize(meta, torch.device("cpu"), state=iter_weights(path))
    with pytest.raises(ValueError, match="has shape"), checkpoint_errors(None):
        materialize(build_on_meta(meta.cfg), torch.device("cpu"), state=iter_weights(path))


@pytest.mark.parametrize("missing", [WEIGHTS, CONFIG, MODEL_FILE])
def test_missing_file_is_named(saved: tuple[Path, Transformer], missing: str) -> None:
    path, _ = saved
    (path / missing).unlink()
    with pytest.raises(InputError, match=rf"missing {missing}"):
        load_checkpoint(path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_hf_config_json_is_refused(saved: tuple[Path, Transformer]) -> None:
    path, _ = saved
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "model_type": "llama"}
    (path / CONFIG).write_text(json.dumps(hf))
    with pytest.raises(InputError, match="is not an llmctl model config") as e:
        load_checkpoint(path)
    assert "import-hf" in (e.value.hint or "")


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"model": {"d_model": 32, "hidden_size": 32}}), json.dumps([1, 2])],
)
def test_bad_config_json_is_refused(saved: tuple[Path, Transformer], text: str) -> None:
    path, _ = saved
    (path / CONFIG).write_text(text)
    with pytest.raises(InputError, match="is not an llmctl model config"):
        load_checkpoint(path)


def test_weights_not_matching_config(saved: tuple[Path, Transformer]) -> None:
    path, _ = saved
    cfg = json.loads((path / CONFIG).read_text())
    cfg["model"]["d_ff"] = 128
    (path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="does not match its config.json"):
        load_checkpoint(path)


def test_other_tokenizer_is_refused(
    saved: tuple[Path, Transformer], tokenizer: Tokenizer, other_tokenizer: Tokenizer
) -> None:
    path, _ = saved
    assert other_tokenizer.vocab_size == tokenizer.vocab_size
    assert other_tokenizer.fingerprint != tokenizer.fingerprint
    with pytest.raises(InputError, match="tokenizer") as e:
        load_checkpoint(path, tokenizer=other_tokenizer)
    assert other_tokenizer.fingerprint in e.value.problem
    assert tokenizer.fingerprint in e.value.problem
    assert load_checkpoint(path, tokenizer=tokenizer).tokenizer is tokenizer


def test_swapped_tokenizer_file_is_refused(
    saved: tuple[Path, Transformer], other_tokenizer: Tokenizer
) -> None:
    path, _ = saved
    other_tokenizer.save(path)  # overwrite the stored tokenizer.model
    with pytest.raises(InputError, match="tokenizer"):
        load_checkpoint(path)


def _train_steps(model: Transformer, opt: torch.optim.Optimizer, ids: torch.Tensor, n: int) -> None:
    model.train()
    for _ in range(n):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_optimizer_state_survives_and_resume_is_exact(tmp_path: Path, tokenizer: Tokenizer) -> None:
    cfg = _cfg(tokenizer, tie_embeddings=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model = _model(cfg)
    opt = make_adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    _train_steps(model, opt, ids, 3)
    path = save_checkpoint(
        tmp_path / "ckpt", model, tokenizer, optimizer=opt, trainer_state={"step": 3}
    )
    assert (path / STATE_TENSORS).is_file()
    assert (path / STATE_JSON).is_file()
    rng_at_save = torch.get_rng_state()

    torch.manual_seed(999)  # disturb the RNG: load must restore it
    resumed = load_checkpoint(path).model
    opt2 = make_adamw(resumed, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    state = load_trainer_state(path, opt2)
    assert state["step"] == 3
    assert torch.equal(torch.get_rng_state(), rng_at_save)

    want, got = opt.state_dict(), opt2.state_dict()
    assert want["state"].keys() == got["state"].keys()
    for i, st in want["state"].items():
        assert st.keys() == got["state"][i].keys()
        for name, v in st.items():
            assert torch.equal(got["state"][i][name], v), (i, name)
    assert json.dumps(got["param_groups"]) == json.dumps(want["param_groups"])

    # Two more steps from the saved state equal two more steps of the original run, bit for bit.
    _train_steps(model, opt, ids, 2)
    _train_steps(resumed, opt2, ids, 2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_trainer_state_missing(saved: tuple[Path, Transformer]) -> None:
    path, _ = saved
    with pytest.raises(InputError, match="has no trainer state"):
        load_trainer_state(path, None)
