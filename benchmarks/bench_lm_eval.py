"""lm-eval loglikelihood requests/s: llmctl's adapter (`--model llmctl`) vs lm-eval's `hf` model.

One small random model (bench_generate's shape) with a SentencePiece tokenizer trained here on the
Python standard library's source is saved as an llmctl checkpoint and exported with `llmctl export`
to a Hugging Face Llama directory. The two sides score the same requests in the same process:

    ours   llmctl.core.lm_eval_adapter.LlmctlLM(path=CKPT, batch_size=B, device="cpu")
    hf     lm_eval.models.huggingface.HFLM(pretrained=EXPORTED_DIR, device="cpu", batch_size=B)

The workload is the shipped offline multiple-choice task `stdlib_module` (llmctl/eval_tasks): for
each of N rows, the task's prompt "Question: Which Python standard library module defines the
function `x`?\\nAnswer:" with each of its 4 choices (" json", ...) as continuation, i.e. the
`loglikelihood` Instances lm-eval builds for a multiple_choice task. Each timed call is one whole
`loglikelihood(requests)` (tokenisation included), the sides interleaved after a warm-up; requests/s
= requests / median seconds. Both sides must give the same log-likelihoods (same weights, fp32): the
script prints the largest absolute difference, how many greedy flags differ, and how many requests
the two tokenise differently (ours encodes context and continuation separately, HF encodes the
whole and splits).

Target (issue 6): ours / hf >= 1.0x. lm-eval's `hf` model needs `accelerate` (lm-eval's [hf]
extra, not an llmctl dependency); without it the script prints "skipped" and exits 0.

    python benchmarks/bench_lm_eval.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import logging
import sysconfig
import tempfile
from pathlib import Path

import _common  # puts the repo root on sys.path: keep it before the llmctl imports
import torch

from llmctl.core.checkpoint import save_checkpoint
from llmctl.core.model import ModelConfig, Transformer, param_count
from llmctl.core.tokenizer import Tokenizer, train_tokenizer

TARGET = 1.0
TASK_ROWS = _common.REPO / "llmctl" / "eval_tasks" / "stdlib_module.jsonl"


def stdlib_lines(max_files: int) -> list[str]:
    """Non-empty lines of the installed standard library's .py files (training text, offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for f in sorted(root.glob("*.py"))[:max_files]:
        lines += [s for s in f.read_text(encoding="utf-8", errors="replace").splitlines() if s]
    return lines


def mc_requests(n_docs: int) -> list:
    """The loglikelihood Instances of stdlib_module's first `n_docs` rows (4 choices each), as
    lm-eval's multiple_choice output type builds them (doc_to_text, target_delimiter " ")."""
    from lm_eval.api.instance import Instance

    rows = [json.loads(s) for s in TASK_ROWS.read_text(encoding="utf-8").splitlines() if s.strip()]
    out = []
    for doc_id, row in enumerate(rows[:n_docs]):
        ctx = (
            "Question: Which Python standard library module defines the "
            f"{row['kind']} `{row['name']}`?\nAnswer:"
        )
        for j, choice in enumerate(row["choices"]):
            out.append(
                Instance(
                    request_type="loglikelihood",
                    doc=row,
                    arguments=(ctx, " " + choice),
                    idx=j,
                    metadata=("stdlib_module", doc_id, 1),
                )
            )
    return out


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256, help="the model's max_seq_len")
    p.add_argument("--docs", type=int, default=200, help="task rows (x4 requests), at most 200")
    p.add_argument("--batch-size", type=int, default=32, help="batch_size of both models")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the requests per side")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = 128, 2, 4, 2, 344
        args.vocab, args.docs, args.repeats = 1024, min(args.docs, 25), 2
    load = _common.ForeignLoad()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM's setup chatter, not results
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # lm-eval's hf model needs accelerate (lm-eval[hf]), not a dependency
        print(f"lm-eval's hf model is unavailable ({e}): pip install accelerate; skipped")
        _common.write_json(args.json, "bench_lm_eval", args, {"skipped": True, "reason": str(e)})
        return

    from llmctl.core.lm_eval_adapter import LlmctlLM
    from llmctl.stages import export

    tok = Tokenizer.from_bytes(
        train_tokenizer(stdlib_lines(40 if args.quick else 200), args.vocab, num_threads=2)
    )
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=args.d_ff,
        max_seq_len=args.seq,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    requests = mc_requests(args.docs)
    n = len(requests)
    print(
        f"bench_lm_eval: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"{param_count(cfg) / 1e6:.2f}M params; stdlib_module {n // 4} rows x 4 choices = {n} "
        f"loglikelihood requests, batch_size {args.batch_size}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    with tempfile.TemporaryDirectory(prefix="bench_lm_eval-") as tmp:
        ckpt, hf_dir = Path(tmp) / "ckpt", Path(tmp) / "hf"
        save_checkpoint(ckpt, model, tok)
        export.run(ckpt, hf_dir, export.ExportConfig(dtype="fp32"))
        ours = LlmctlLM(path=str(ckpt), batch_size=args.batch_size, device="cpu")
        hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=args.batch_size)

        out: dict[str, list[tuple[float, bool]]] = {}

        def run_ours() -> None:
            out["ours"] = ours.loglikelihood(requests)

        def run_hf() -> None:
            out["hf"] = hf.loglikelihood(requests, disable_tqdm=True)

        times = _common.interleaved(
            {"ours": run_ours, "hf": run_hf}, repeats=args.repeats, warmup=1
        )
        split_diff = sum(
            tuple(ours.encode_pair(*r.args)) != tuple(hf._encode_pair(*r.args)) for r in requests
        )

    diffs = [abs(a[0] - b[0]) for a, b in zip(out["ours"], out["hf"], strict=True)]
    greedy_diff = sum(a[1] != b[1] for a, b in zip(out["ours"], out["hf"], strict=True))
    t_ours, t_hf = _common.median(times["ours"]), _common.median(times["hf"])
    row = {
        "requests": n,
        "batch_size": args.batch_size,
        "ours_req_s": n / t_ours,
        "hf_req_s": n / t_hf,
        "ratio": t_hf / t_ours,
        "ratio_best": min(times["hf"]) / min(times["ours"]),
        "max_abs_diff": max(diffs),
        "greedy_flags_differing": greedy_diff,
        "token_splits_differing": split_diff,
        "rounds": _common.rounds_note(times),
        "foreign_cpu": times.foreign,
        "ours_s": times["ours"],
        "hf_s": times["hf"],
    }
    print(
        f"  log-likelihoods: max abs diff ours vs hf {row['max_abs_diff']:.2e} "
        f"(mean {sum(diffs) / n:.2e}); greedy flags differing {greedy_diff}/{n}; token splits "
        f"differing {split_diff}/{n}; seconds ours {_common.spread(times['ours'])}, "
        f"hf {_common.spread(times['hf'])}; {row['rounds']}"
    )
    print()
    print(
        _common.table(
            [{**row, "target": f">= {TARGET}", "met": row["ratio"] >= TARGET}],
            [
                "requests",
                "batch_size",
                "ours_req_s",
                "hf_req_s",
                "ratio",
                "ratio_best",
                "max_abs_diff",
                "target",
                "met",
            ],
        )
    )
    print(
        "ratio = ours requests/s / hf requests/s (median of interleaved runs; "
        "ratio_best: fastest run of each)"
    )
    print(load.report())
    _common.write_json(
        args.json,
        "bench_lm_eval",
        args,
        {
            "foreign_cpu_share": load.share(),
            "target": TARGET,
            "config": cfg.to_dict(),
            "rows": [row],
        },
    )


if __name__ == "__main__":
    main()
