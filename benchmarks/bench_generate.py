"""KV-cache generation throughput: `llmctl.core.sampling.generate` vs Hugging Face `generate`.

Same shape and weights (copied through the hf_compat mapping), same prompts (random ids, equal
length in a batch, so neither side pads), greedy decoding of exactly N new tokens with no stop
token (HF: `do_sample=False, max_new_tokens=N, min_new_tokens=N` with its default dynamic KV
cache). Ours runs as `llmctl generate` does: weights in `Transformer.inference_layout`
(`--default-layout` to measure without it). Each timed call is one whole generation (prefill + N steps), the two sides interleaved after
a warm-up; tokens/s = batch * N / median seconds. Both sides must produce the same greedy tokens
(fp32, same weights): the script prints whether they match.

Target: ours / HF >= 1.5x.

    python benchmarks/bench_generate.py [--quick] [--json PATH]
"""

from __future__ import annotations

import _common  # puts the repo root on sys.path: keep it before the llmctl imports
import torch

from llmctl.core.model import ModelConfig, Transformer, param_count
from llmctl.core.sampling import SamplingConfig, generate

TARGET = 1.5


def bench(ours: Transformer, hf, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    cfg = ours.cfg
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(8, cfg.vocab_size, (batch, prompt_len), generator=g)
    prompt_lists = prompts.tolist()
    mask = torch.ones_like(prompts)
    scfg = SamplingConfig(max_new_tokens=new, temperature=0.0)
    out: dict[str, list[list[int]]] = {}

    def run_ours() -> None:
        out["ours"] = generate(ours, prompt_lists, scfg)

    def run_hf() -> None:
        with torch.no_grad():
            seq = hf.generate(
                prompts,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        out["hf"] = seq[:, prompt_len:].tolist()

    times = _common.interleaved({"ours": run_ours, "hf": run_hf}, repeats=repeats, warmup=1)
    t_ours, t_hf = _common.median(times["ours"]), _common.median(times["hf"])
    tokens = batch * new
    lengths_ok = all(len(r) == new for r in out["ours"]) and all(len(r) == new for r in out["hf"])
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "ours_tok_s": tokens / t_ours,
        "hf_tok_s": tokens / t_hf,
        "ratio": t_hf / t_ours,
        "ratio_best": min(times["hf"]) / min(times["ours"]),
        "tokens_match": out["ours"] == out["hf"],
        "rows_matching": sum(a == b for a, b in zip(out["ours"], out["hf"], strict=True)),
        "all_lengths_n": lengths_ok,
        "rounds": _common.rounds_note(times),
        "foreign_cpu": times.foreign,
        "ours_s": times["ours"],
        "hf_s": times["hf"],
    }


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed generations per side and batch size"
    )
    p.add_argument(
        "--default-layout",
        action="store_true",
        help="keep the training layout of the weights (no Transformer.inference_layout)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _common.ForeignLoad()
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = 128, 2, 4, 2, 344
        args.vocab, args.prompt_len, args.new_tokens, args.repeats = 2048, 16, 32, 3

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter, not results
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=args.d_ff,
        max_seq_len=max(64, args.prompt_len + args.new_tokens),
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf = _common.hf_llama_like(ours).eval()
    if not args.default_layout:
        ours.inference_layout()  # as `load_checkpoint(..., inference=True)` in generate/chat/serve
    hf.generation_config.eos_token_id = None  # no stop token on either side: exactly N new tokens
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    print(
        f"bench_generate: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
        f"vocab {cfg.vocab_size}, {param_count(cfg) / 1e6:.2f}M params; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for b in [int(s) for s in args.batches.split(",") if s.strip()]:
        r = bench(ours, hf, b, args.prompt_len, args.new_tokens, args.repeats)
        rows.append(r)
        print(
            f"  batch {b}: same greedy tokens as HF: {'yes' if r['tokens_match'] else 'NO'} "
            f"({r['rows_matching']}/{b} rows); seconds ours {_common.spread(r['ours_s'])}, "
            f"hf {_common.spread(r['hf_s'])}; {r['rounds']}"
        )
    print()
    print(
        _common.table(
            [{**r, "target": f">= {TARGET}", "met": r["ratio"] >= TARGET} for r in rows],
            [
                "batch",
                "new_tokens",
                "ours_tok_s",
                "hf_tok_s",
                "ratio",
                "ratio_best",
                "tokens_match",
                "target",
                "met",
            ],
        )
    )
    print(
        "ratio = ours tokens/s / HF tokens/s (median of interleaved runs; ratio_best: fastest run of each)"
    )
    print(load.report())
    _common.write_json(
        args.json,
        "bench_generate",
        args,
        {
            "foreign_cpu_share": load.share(),
            "target": TARGET,
            "config": cfg.to_dict(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
