"""export and import-hf: transformers loads the export (same logits, same token ids, same chat
template), import-hf inverts it bit for bit, and foreign models fail with exit code 2 and no output."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.checkpoint import load_checkpoint, save_checkpoint
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.sampling import SamplingConfig, generate
from llmctl.core.tokenizer import Tokenizer
from llmctl.stages import export, import_hf

transformers = pytest.importorskip("transformers")
runner = CliRunner()

# name, n_kv_heads, tie_embeddings, rope_theta: MHA / GQA / MQA, tied and untied, non-default bases.
VARIANTS = [
    ("mha-tied", 4, True, 10000.0),
    ("gqa-untied", 2, False, 500000.0),
    ("mqa-tied", 1, True, 1234.5),
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tokens_dir: Path) -> Tokenizer:
    """The 512-id tokenizer of the shared tokens artifact."""
    return Tokenizer.load(tokens_dir)


def make_ckpt(
    path: Path, tok: Tokenizer, *, n_kv: int = 2, tie: bool = True, theta: float = 1e4
) -> Path:
    """A random 2-layer checkpoint; norm weights are perturbed so they are not all ones."""
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=n_kv,
        d_ff=64,
        max_seq_len=64,
        rope_theta=theta,
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return save_checkpoint(path, model, tok)


def sample_texts() -> list[str]:
    """Code with indentation, prose, whitespace runs, digits, Unicode and byte-fallback characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in ("argparse.py", "json/decoder.py", "calendar.py"):
        src = (root / name).read_text(encoding="utf-8")
        texts += [src[i : i + 400] for i in range(0, 12000, 400)]
    return texts + [
        "Hello world",
        "  two leading spaces",
        "trailing spaces   ",
        "\ttab\n\nblank line\r\nCRLF",
        "    def f(x):\n        return x ** 2  # square\n",
        "Der Bär läuft über die Straße, naïve café",
        "日本語のテキスト 😀 emoji, مرحبا, Ελληνικά, русский",
        "3.14159 and 1,000,000 and 2024-11-23",
        "",
        " ",
        "a  b   c    d",
    ]


# -- export -> transformers ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_kv", "tie", "theta"), VARIANTS)
def test_export_loads_in_transformers_with_equal_logits(
    tmp_path: Path, tok: Tokenizer, name: str, n_kv: int, tie: bool, theta: float
) -> None:
    ck = make_ckpt(tmp_path / "ck", tok, n_kv=n_kv, tie=tie, theta=theta)
    m = export.run(ck, tmp_path / "hf", export.ExportConfig())
    assert m.kind == "hf-model"
    assert m.tokenizer["fingerprint"] == tok.fingerprint
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.dtype == torch.float32
    assert hf.config.tie_word_embeddings is tie
    ours = load_checkpoint(ck).model
    ids = torch.tensor([tok.encode(t, bos=True)[:64] for t in sample_texts()[:4]])
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{name}: max |logit difference| {diff}"


def test_hf_generate_matches_ours_greedy(tmp_path: Path, tok: Tokenizer) -> None:
    """generation_config.json stops where we stop; greedy decoding agrees token for token."""
    ck = make_ckpt(tmp_path / "ck", tok)
    export.run(ck, tmp_path / "hf", export.ExportConfig())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert list(hf.generation_config.eos_token_id) == [tok.eos_id, tok.end_id]
    prompt = tok.encode("def main():\n    ", bos=True)
    ours = generate(
        load_checkpoint(ck).model,
        [prompt],
        SamplingConfig(max_new_tokens=12, temperature=0),
        stop_ids=[tok.eos_id, tok.end_id],
    )[0]
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)
    assert out[0, len(prompt) :].tolist() == ours


def test_export_bf16_halves_the_weights(tmp_path: Path, tok: Tokenizer) -> None:
    ck = make_ckpt(tmp_path / "ck", tok)
    export.run(ck, tmp_path / "hf", export.ExportConfig(dtype="bf16"))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# -- tokenizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("hfexport")
    export.run(make_ckpt(root / "ck", tok), root / "hf", export.ExportConfig())
    return root / "hf"


def test_hf_tokenizer_encodes_and_decodes_like_ours(hf_dir: Path, tok: Tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert "LlamaTokenizer" in type(hf).__name__
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    for text in sample_texts():
        ids = tok.encode(text, bos=True)
        assert hf(text)["input_ids"] == ids, repr(text[:60])
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids), repr(text[:60])
    # Typed special-token text: HF matches it as the control token unless told not to.
    typed = "say <|user|> or <s>"
    assert hf(typed)["input_ids"] != tok.encode(typed, bos=True)
    assert hf(typed, split_special_tokens=True)["input_ids"] == tok.encode(typed, bos=True)


def test_tokenizer_json_alone_encodes_like_ours(hf_dir: Path, tok: Tokenizer) -> None:
    """tokenizer.json is used as is by tokenizers (and transformers 4.x), so it must be exact too."""
    from tokenizers import Tokenizer as HfTokenizer

    raw = HfTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in sample_texts():
        assert raw.encode(text).ids == tok.encode(text, bos=True), repr(text[:60])


def test_apply_chat_template_equals_render_chat(hf_dir: Path, tok: Tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Show code:\n    x = 1\n"},
            {"role": "assistant", "content": "  Here: `x = 1` — ok? 😀"},
            {"role": "user", "content": "Danke schön"},
        ],
    ]
    for msgs in chats:
        for gen in (False, True):
            ours = tok.render_chat(msgs, add_generation_prompt=gen)[0]
            theirs = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            if not isinstance(theirs, list):  # transformers 5 returns a BatchEncoding
                theirs = theirs["input_ids"]
            assert theirs == ours


# -- import-hf -------------------------------------------------------------------------------------


def test_export_import_round_trip_is_exact(tmp_path: Path, tok: Tokenizer) -> None:
    ck = make_ckpt(tmp_path / "ck", tok, n_kv=2, tie=False, theta=5e5)
    export.run(ck, tmp_path / "hf", export.ExportConfig())
    m = import_hf.run(tmp_path / "hf", tmp_path / "back", import_hf.ImportHfConfig())
    assert (m.kind, m.stage) == ("checkpoint", "import-hf")
    a = load_file(str(ck / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = load_checkpoint(tmp_path / "back")
    assert back.tokenizer.fingerprint == tok.fingerprint
    assert back.model.cfg == load_checkpoint(ck).model.cfg
    export.run(tmp_path / "back", tmp_path / "hf2", export.ExportConfig())
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model"):
        assert (tmp_path / "hf" / f).read_bytes() == (tmp_path / "hf2" / f).read_bytes(), f


def test_import_of_a_transformers_saved_sharded_model(tmp_path: Path, tok: Tokenizer) -> None:
    """A model made and saved by transformers itself (sharded safetensors) imports with equal logits."""
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=20000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    export.write_hf_tokenizer(tmp_path / "hf", tok, 64)
    import_hf.run(tmp_path / "hf", tmp_path / "ck", import_hf.ImportHfConfig(max_seq_len=48))
    ours = load_checkpoint(tmp_path / "ck").model
    assert (ours.cfg.rope_theta, ours.cfg.max_seq_len, ours.cfg.n_kv_heads) == (20000.0, 48, 2)
    ids = torch.tensor([tok.encode(sample_texts()[0], bos=True)[:48]])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


# -- refusals: exit 2, a message that says why, no output left behind -------------------------------


def _assert_refused(args: list[str], out: Path, *needles: str) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    for n in needles:
        assert n in r.stderr, r.stderr
    assert not out.exists()
    leftovers = [
        p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))
    ]
    assert not leftovers


@pytest.fixture
def exported(tmp_path: Path, hf_dir: Path) -> Path:
    """A private copy of an export, to break."""
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def test_import_refuses_a_gpt2_model(exported: Path) -> None:
    (exported / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32})
    )
    _assert_refused(
        ["import-hf", str(exported), "-o", str(exported.parent / "out")],
        exported.parent / "out",
        "'gpt2'",
        "Llama-architecture",
    )


def test_import_refuses_rope_scaling(exported: Path) -> None:
    cfg = json.loads((exported / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (exported / "config.json").write_text(json.dumps(cfg))
    _assert_refused(
        ["import-hf", str(exported), "-o", str(exported.parent / "out")],
        exported.parent / "out",
        "llama3",
    )


def test_import_refuses_a_bpe_only_tokenizer(exported: Path) -> None:
    (exported / "tokenizer.model").unlink()
    _assert_refused(
        ["import-hf", str(exported), "-o", str(exported.parent / "out")],
        exported.parent / "out",
        "SentencePiece",
        "tokenizer.json",
    )


def test_import_refuses_a_tokenizer_without_our_special_tokens(exported: Path) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts() * 4),
        model_writer=buf,
        vocab_size=200,
        minloglevel=2,
    )
    (exported / "tokenizer.model").write_bytes(buf.getvalue())
    _assert_refused(
        ["import-hf", str(exported), "-o", str(exported.parent / "out")],
        exported.parent / "out",
        "<|user|>",
        "special tokens",
    )


def test_import_refuses_pickled_weights(exported: Path) -> None:
    (exported / "model.safetensors").rename(exported / "pytorch_model.bin")
    _assert_refused(
        ["import-hf", str(exported), "-o", str(exported.parent / "out")],
        exported.parent / "out",
        "pytorch_model.bin",
        "safetensors",
    )


def test_export_refuses_a_reward_model(tmp_path: Path, tok: Tokenizer) -> None:
    ck = make_ckpt(tmp_path / "rm", tok)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["head"] = {"kind": "reward", "file": "head.safetensors"}
    (ck / "config.json").write_text(json.dumps(cfg))
    _assert_refused(
        ["export", str(ck), "-o", str(tmp_path / "out")], tmp_path / "out", "reward model"
    )


def test_export_cli_writes_and_refuses_to_overwrite(tmp_path: Path, tok: Tokenizer) -> None:
    ck = make_ckpt(tmp_path / "ck", tok)
    r = runner.invoke(app, ["export", str(ck), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "manifest.json").is_file()
    r = runner.invoke(app, ["export", str(ck), "-o", str(tmp_path / "hf")])
    assert r.exit_code == 2
    assert "already exists" in r.stderr
    r = runner.invoke(app, ["import-hf", str(tmp_path / "hf"), "-o", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", ["export", "import-hf", "chat"])
def test_help_has_an_example(name: str) -> None:
    r = runner.invoke(app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.stdout
