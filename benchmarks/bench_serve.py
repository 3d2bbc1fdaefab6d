"""`llmctl serve` throughput: generation tokens/s through the HTTP API, one stream and 8 at once.

A model of bench_generate's shape (random weights) and a SentencePiece tokenizer trained here on
the Python standard library's source are saved as a checkpoint and served by `llmctl serve` in a
child process on loopback; the client here streams with httpx. Sides, interleaved after a warm-up:

    serve_1   one streaming /v1/completions request, N new tokens (also: time to first token)
    serve_8   8 concurrent streaming requests (different prompts, so a ragged batch), N tokens each
    tok_1/8   the same through a second server started with stream_interval_ms = 0 (one SSE chunk
              per token; the default, 20 ms, sends a chunk of the tokens made in that time)
    gen_1/8   core/sampling.generate called directly on the same prompts (the server's overhead)
    hf_1/8    Hugging Face `generate` on the same weights (hf_compat, as `llmctl export` writes them)

All greedy. Tokens/s counts the tokens each side actually produced (the server's `usage`; a row
stops early only if it samples EOS or end-of-turn, whose output rows are zeroed here so they are
never the argmax). The target of issue 7: serve at batch 1 >= 1.5x HF `generate` at batch 1.

    python benchmarks/bench_serve.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Both processes (this one and the server) wait passively in OpenMP: with libgomp's default
# spin-waiting, two torch processes on a small shared machine starve each other and the side that
# happens to run beside an idle-but-spinning one looks 10x slower. Set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common  # noqa: E402  (puts the repo root on sys.path: keep it before the llmctl imports)
import httpx  # noqa: E402
import torch  # noqa: E402

from llmctl.core.checkpoint import save_checkpoint
from llmctl.core.model import ModelConfig, Transformer, param_count
from llmctl.core.sampling import SamplingConfig, generate
from llmctl.core.tokenizer import Tokenizer, train_tokenizer

TARGET = 1.5
CONCURRENT = 8


def stdlib_lines(max_files: int) -> list[str]:
    """Non-empty lines of the installed standard library's .py files (training text, offline)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for f in sorted(root.glob("*.py"))[:max_files]:
        lines += [s for s in f.read_text(encoding="utf-8", errors="replace").splitlines() if s]
    return lines


class Server:
    """`llmctl serve CKPT` in a child process (as deployed: its own interpreter, so the client's
    work here does not share its GIL), on a free loopback port."""

    def __init__(
        self, ckpt: Path, max_batch: int, threads: int, config: Path | None = None
    ) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "llmctl", "-q", "serve", str(ckpt), "--port", str(port)]
        cmd += ["--max-batch", str(max_batch), "--model-name", "m", "--device", "cpu"]
        cmd += ["--config", str(config)] if config else []
        # Same OpenMP settings as this process; threads: torch's default (or --threads).
        env = dict(os.environ)  # OMP_WAIT_POLICY=PASSIVE included
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        _common.HELPER_PIDS.add(self.proc.pid)  # its CPU is this benchmark's, not foreign load
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llmctl serve exited: {self.proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("llmctl serve did not come up in 120 s")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def batches(self) -> int:
        return int(httpx.get(self.url + "/health").json()["batches"])

    def stop(self) -> None:
        _common.HELPER_PIDS.discard(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=688)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per side")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = 128, 2, 4, 2, 344
        args.vocab, args.new_tokens, args.repeats = 1024, 32, 2
    load = _common.ForeignLoad()

    tok = Tokenizer.from_bytes(
        train_tokenizer(stdlib_lines(40 if args.quick else 200), args.vocab, num_threads=2)
    )
    prompts = [f"def function_{i}(values):\n    " + "x = 1\n    " * i for i in range(CONCURRENT)]
    ids = [tok.encode(s, bos=True) for s in prompts]
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=args.d_ff,
        max_seq_len=max(len(x) for x in ids) + args.new_tokens + 8,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # never stop early: EOS / end-of-turn get logit 0
        model.lm_head.weight[[tok.eos_id, tok.end_id]] = 0
    N = args.new_tokens
    print(
        f"bench_serve: d_model {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"{param_count(cfg) / 1e6:.2f}M params; {N} new tokens per request, greedy; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve-")
    save_checkpoint(Path(tmp.name) / "ckpt", model, tok)
    model.inference_layout()  # the direct side decodes as the server's load_checkpoint has it
    server = Server(Path(tmp.name) / "ckpt", CONCURRENT, args.threads)
    per_token = Path(tmp.name) / "per_token.toml"
    per_token.write_text("[serve]\nstream_interval_ms = 0\n", encoding="utf-8")
    try:
        tok_server = Server(Path(tmp.name) / "ckpt", CONCURRENT, args.threads, per_token)
    except RuntimeError:
        server.stop()
        raise
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=2 * CONCURRENT))
    made: dict[str, int] = {}
    ttft: list[float] = []

    def ask(prompt: str, srv: Server = server, single: bool = False) -> int:
        """One streaming completion; returns the completion tokens from the final usage chunk."""
        body = {
            "model": "m",
            "prompt": prompt,
            "max_tokens": N,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0, first, n = time.perf_counter(), None, 0
        with http.stream("POST", srv.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
        if single and srv is server:
            ttft.append(first or 0.0)
        return n

    def serve_1(name: str = "serve_1", srv: Server = server) -> None:
        made[name] = ask(prompts[0], srv, single=True)

    def serve_8(name: str = "serve_8", srv: Server = server) -> None:
        with ThreadPoolExecutor(CONCURRENT) as pool:
            made[name] = sum(pool.map(lambda p: ask(p, srv), prompts))

    greedy = SamplingConfig(max_new_tokens=N, temperature=0.0)

    def gen(k: int) -> None:
        out = generate(model, ids[:k], greedy, stop_ids=[tok.eos_id, tok.end_id])
        made[f"gen_{k}"] = sum(len(r) for r in out)

    sides = {
        "serve_1": serve_1,
        "serve_8": serve_8,
        "tok_1": lambda: serve_1("tok_1", tok_server),
        "tok_8": lambda: serve_8("tok_8", tok_server),
        "gen_1": lambda: gen(1),
        "gen_8": lambda: gen(8),
    }
    if not args.no_hf:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf = _common.hf_llama_like(model).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.bos_token_id = None
        hf.generation_config.pad_token_id = tok.pad_id
        L = len(ids[0])
        same = [ids[0]] * CONCURRENT  # HF pads only when asked to: equal-length rows

        def hf_gen(k: int) -> None:
            x = torch.tensor(same[:k])
            with torch.no_grad():
                seq = hf.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=N,
                    min_new_tokens=N,
                )
            made[f"hf_{k}"] = int(seq[:, L:].numel())

        sides |= {"hf_1": lambda: hf_gen(1), "hf_8": lambda: hf_gen(8)}
    try:
        times = _common.interleaved(sides, repeats=args.repeats, warmup=1)
        batches = server.batches()
    finally:
        server.stop()
        tok_server.stop()
        tmp.cleanup()
    rate = {k: made[k] / _common.median(v) for k, v in times.items()}
    rows = [
        {
            "side": k,
            "tokens": made[k],
            "tok_s": rate[k],
            "seconds": _common.median(v),
            "spread_s": _common.spread(v),
        }
        for k, v in times.items()
    ]
    print()
    print(_common.table(rows, ["side", "tokens", "tok_s", "seconds", "spread_s"]))
    print(f"time to first token, single stream: median {_common.median(ttft) * 1000:.1f} ms")
    print(f"timed rounds: {_common.rounds_note(times)}")
    results: dict = {
        "config": cfg.to_dict(),
        "new_tokens": N,
        "rows": rows,
        "raw_s": dict(times),
        "batches_decoded": batches,
        "ttft_s_median": _common.median(ttft),
        "foreign_cpu_share": load.share(),
        "target": TARGET,
    }
    print(
        f"ratio serve_8 / serve_1 (batching gain): {rate['serve_8'] / rate['serve_1']:.2f}x; "
        f"ratio serve / direct generate: batch 1 {rate['serve_1'] / rate['gen_1']:.2f}, "
        f"batch 8 {rate['serve_8'] / rate['gen_8']:.2f}; one chunk per token (tok / direct "
        f"generate): batch 1 {rate['tok_1'] / rate['gen_1']:.2f}, batch 8 "
        f"{rate['tok_8'] / rate['gen_8']:.2f}"
    )
    if not args.no_hf:
        r1, r8 = rate["serve_1"] / rate["hf_1"], rate["serve_8"] / rate["hf_8"]
        t1, t8 = rate["tok_1"] / rate["hf_1"], rate["tok_8"] / rate["hf_8"]
        print(
            f"ratio serve / HF generate: batch 1 {r1:.2f} (target >= {TARGET}: "
            f"{'met' if r1 >= TARGET else 'missed'}), batch 8 {r8:.2f}; one chunk per token: "
            f"batch 1 {t1:.2f}, batch 8 {t8:.2f}"
        )
        results |= {
            "ratio_serve_hf_1": r1,
            "ratio_serve_hf_8": r8,
            "ratio_tok_hf_1": t1,
            "ratio_tok_hf_8": t8,
        }
    print(load.report())
    _common.write_json(args.json, "bench_serve", args, results)


if __name__ == "__main__":
    main()
