"""Training-step throughput: llmctl's Transformer vs Hugging Face's LlamaForCausalLM (sdpa).

Same shape, same weights (copied through the hf_compat mapping), same batch, same loss (mean next-
token cross entropy in fp32), same optimizer (torch AdamW with its default CPU implementation). Each
side computes the loss its usual way: HF returns the full (B*T, vocab) logits and
`F.cross_entropy` runs on them; ours runs what `llmctl pretrain` runs, `model(inp, targets=tgt)`,
the fused chunked LM head + cross entropy of `llmctl.core.losses` that never builds those logits. One timed step = forward + backward + AdamW step + zero_grad. The two
models run interleaved after a warm-up; the figure is the median step time as tokens/s.

Precisions: fp32, and bf16 autocast (weights stay fp32). HF runs under `torch.autocast`, ours under
`Runtime.autocast()`, what `llmctl pretrain --precision bf16` runs. On a CPU without native bf16 (no
AVX512-BF16/AMX) torch's bf16 matmuls and attention take generic code paths 7-10x slower than fp32;
`Runtime.autocast` routes them through fp32 kernels on bf16-rounded operands instead (the same
numbers: `llmctl/core/cpu_bf16.py`). bf16 is measured at a quarter of the batch there by default, to
keep HF's side short, and the output says so.

Target: ours / HF >= 1.3x.

    python benchmarks/bench_train.py [--quick] [--json PATH]
"""

from __future__ import annotations

import contextlib

import _common  # puts the repo root on sys.path: keep it before the llmctl imports
import torch
import torch.nn.functional as F

from llmctl.core.model import ModelConfig, Transformer, param_count
from llmctl.core.runtime import Runtime

TARGET = 1.3


def make_step(model, opt, inp, tgt, *, hf: bool, bf16: bool):
    """One optimizer step; returns the loss."""

    def step() -> float:
        if not bf16:
            ctx = contextlib.nullcontext()
        elif hf:  # what HF users run: torch's autocast
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        else:  # what `llmctl pretrain --precision bf16` runs (`Runtime.autocast`, core/cpu_bf16.py)
            ctx = Runtime(torch.device("cpu"), "bf16").autocast()
        with ctx:
            if hf:  # the usual way: full logits, then cross entropy on them in fp32
                logits = model(inp).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
            else:  # what `llmctl pretrain` runs: fused, chunked LM head + cross entropy
                loss = model(inp, targets=tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def bench(
    cfg: ModelConfig, batch: int, seq: int, *, bf16: bool, repeats: int, compile: bool = False
) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg).train()
    hf = _common.hf_llama_like(ours).train()
    ids = torch.randint(
        0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)
    )
    inp, tgt = ids[:, :-1], ids[:, 1:]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    steps = {
        "ours": make_step(ours, opt_ours, inp, tgt, hf=False, bf16=bf16),
        "hf": make_step(hf, opt_hf, inp, tgt, hf=True, bf16=bf16),
    }
    if compile:  # a third side: our model under torch.compile (what `pretrain --compile` runs)
        torch.manual_seed(0)
        ours_c = Transformer(cfg).train()
        opt_c = torch.optim.AdamW(ours_c.parameters(), lr=1e-4, weight_decay=0.1)
        steps["ours_compiled"] = make_step(
            torch.compile(ours_c), opt_c, inp, tgt, hf=False, bf16=bf16
        )
    # First step of each from identical weights: the losses must agree (same function).
    loss0 = {k: f() for k, f in steps.items()}
    times = _common.interleaved(steps, repeats=repeats, warmup=2 if compile else 1)
    tokens = batch * seq
    t_ours, t_hf = _common.median(times["ours"]), _common.median(times["hf"])
    extra = {}
    if compile:
        t_c = _common.median(times["ours_compiled"])
        extra = {
            "ours_compiled_tok_s": tokens / t_c,
            "ratio_compiled": t_hf / t_c,
            "ours_compiled_step_s": times["ours_compiled"],
        }
    return {
        "precision": "bf16-autocast" if bf16 else "fp32",
        "batch": batch,
        "seq": seq,
        "ours_tok_s": tokens / t_ours,
        "hf_tok_s": tokens / t_hf,
        "ratio": t_hf / t_ours,
        "ratio_best": min(times["hf"]) / min(times["ours"]),
        **extra,
        "rounds": _common.rounds_note(times),
        "foreign_cpu": times.foreign,
        "ours_step_s": times["ours"],
        "hf_step_s": times["hf"],
        "first_loss_ours": loss0["ours"],
        "first_loss_hf": loss0["hf"],
    }


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--bf16-batch",
        type=int,
        default=0,
        help="batch for bf16 (0: --batch, or 2 without native bf16)",
    )
    p.add_argument(
        "--repeats", type=int, default=7, help="timed steps per model and precision (fp32)"
    )
    p.add_argument("--bf16-repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument(
        "--compile", action="store_true", help="also time our model under torch.compile (fp32 only)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = _common.ForeignLoad()
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = 128, 2, 4, 2, 344
        args.vocab, args.seq, args.batch, args.repeats, args.bf16_repeats = 2048, 128, 4, 3, 2
    native_bf16 = _common.cpu_has_native_bf16() or torch.cuda.is_available()
    bf16_batch = args.bf16_batch or (args.batch if native_bf16 else max(1, args.batch // 4))

    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq,
    )
    print(
        f"bench_train: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
        f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, seq {args.seq}; {param_count(cfg) / 1e6:.2f}M params; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    rows = []
    for prec in [s.strip() for s in args.precisions.split(",") if s.strip()]:
        bf16 = prec == "bf16"
        if bf16 and not native_bf16:
            print(
                "note: this CPU has no native bf16 (no AVX512-BF16/AMX): torch's bf16 matmuls take slow "
                "generic kernels (HF's side); llmctl's Runtime.autocast runs them as fp32 GEMMs on "
                f"bf16-rounded operands (core/cpu_bf16.py); measured at batch {bf16_batch} for time"
            )
        r = bench(
            cfg,
            bf16_batch if bf16 else args.batch,
            args.seq,
            bf16=bf16,
            repeats=args.bf16_repeats if bf16 else args.repeats,
            compile=args.compile and not bf16,
        )
        r["native_bf16"] = native_bf16 if bf16 else None
        rows.append(r)
        print(
            f"  {r['precision']}: first loss ours {r['first_loss_ours']:.5f} hf {r['first_loss_hf']:.5f}; "
            f"step s ours {_common.spread(r['ours_step_s'])}, hf {_common.spread(r['hf_step_s'])}; "
            f"{r['rounds']}"
        )
    print()
    print(
        _common.table(
            [{**r, "target": f">= {TARGET}", "met": r["ratio"] >= TARGET} for r in rows],
            [
                "precision",
                "batch",
                "seq",
                "ours_tok_s",
                "hf_tok_s",
                "ratio",
                "ratio_best",
                "target",
                "met",
            ]
            + (["ours_compiled_tok_s", "ratio_compiled"] if args.compile else []),
        )
    )
    print(
        "ratio = ours tokens/s / HF tokens/s (median step, interleaved; ratio_best: fastest step of each)"
    )
    print(load.report())
    _common.write_json(
        args.json,
        "bench_train",
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
