"""PPO step time on CPU for the tiny preset, split into generation, scoring and optimisation.

One PPO step = roll out `--batch-prompts` answers with the KV-cache sampler (temperature 1) + score
them (the reward, then log-probs of policy and frozen reference and the critic's values on every
answer token) + `--ppo-epochs` passes of minibatch updates of policy and critic. Two reward sources
are measured: a rule (a Python function on the decoded text: nearly free) and a reward model (one
more forward of a same-sized decoder). The policy is randomly initialised, so answers run to
`--max-new-tokens` (no early <|end|>): the worst case for generation. The first step is a warm-up
and is left out; the figures are medians over the rest.

The answer to "where does the time go" is the share column; `opt/gen ratio` says how many
generation-phases one update phase costs.

    python benchmarks/bench_ppo.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
import sysconfig
import tempfile
from pathlib import Path

import _common  # puts the repo root on sys.path: keep it before the llmctl imports
import torch

from llmctl.core.checkpoint import save_checkpoint
from llmctl.core.heads import RewardModel, save_reward_model
from llmctl.core.model import Transformer, param_count, preset
from llmctl.core.tokenizer import Tokenizer, train_tokenizer
from llmctl.core.train_loop import read_metrics
from llmctl.stages import ppo

REWARD_PY = "def digits(prompt, response, row):\n    return sum(map(str.isdigit, response)) / max(1, len(response))\n"
PHASES = ("time_gen", "time_score", "time_opt")


def setup(root: Path, vocab: int) -> dict[str, str]:
    """A tokenizer from stdlib text, a random tiny-preset policy, a reward model, prompts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [
        ln
        for name in ("textwrap.py", "string.py", "functools.py", "shlex.py")
        for ln in (stdlib / name).read_text(encoding="utf-8").splitlines()
        if ln.strip()
    ]
    tok = Tokenizer.from_bytes(train_tokenizer(lines, vocab))
    cfg = preset("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    save_checkpoint(root / "init", Transformer(cfg), tok)
    save_reward_model(root / "rm", RewardModel(Transformer(cfg)), tok)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i, ln in enumerate(lines[:256]):
            f.write(json.dumps({"prompt": f"Explain this line ({i}): {ln.strip()[:80]}"}) + "\n")
    (root / "rewards.py").write_text(REWARD_PY)
    return {"init": str(root / "init"), "rm": str(root / "rm"), "prompts": str(root / "prompts.jsonl"),
            "rule": f"{root / 'rewards.py'}:digits", "params": param_count(cfg)}  # fmt: skip


def bench(paths: dict, args, reward: str) -> dict:
    """Run PPO; median seconds per phase over the steps after the first."""
    over = {"reward": paths["rule"]} if reward == "rule" else {"reward_model": paths["rm"]}
    cfg = ppo.PPOConfig(
        prompts=paths["prompts"], init=paths["init"], steps=args.steps,
        batch_prompts=args.batch_prompts, minibatch=args.minibatch, ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens, device="cpu", precision="fp32", **over,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        ppo.run(Path(d) / "out", cfg)
        recs = [r for r in read_metrics(Path(d) / "out" / "metrics.jsonl") if "score" in r][1:]
    med = {k: statistics.median(r[k] for r in recs) for k in PHASES}
    total = sum(med.values())
    tokens = statistics.median(r["response_len"] for r in recs) * args.batch_prompts
    return {
        "reward": reward,
        "gen_s": med["time_gen"],
        "score_s": med["time_score"],
        "opt_s": med["time_opt"],
        "step_s": total,
        "gen_share": med["time_gen"] / total,
        "score_share": med["time_score"] / total,
        "opt_share": med["time_opt"] / total,
        "gen_tok_s": tokens / med["time_gen"],
        "opt_gen_ratio": med["time_opt"] / med["time_gen"],
        "steps_timed": len(recs),
    }


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="PPO steps per reward source (1 warm-up)")
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.batch_prompts, args.max_new_tokens = 3, 8, 16
        args.ppo_epochs, args.vocab = 1, 512
    load = _common.ForeignLoad()
    with tempfile.TemporaryDirectory() as d:
        paths = setup(Path(d), args.vocab)
        print(
            f"bench_ppo: tiny preset ({paths['params'] / 1e6:.2f}M params, vocab {args.vocab}), "
            f"{args.batch_prompts} prompts x {args.max_new_tokens} new tokens per step, "
            f"{args.ppo_epochs} epochs of minibatch {args.minibatch}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        rows = [bench(paths, args, r) for r in ("rule", "rm")]
    print()
    print(_common.table(rows, ["reward", "gen_s", "score_s", "opt_s", "step_s", "gen_share",
                               "score_share", "opt_share", "gen_tok_s", "opt_gen_ratio"]))  # fmt: skip
    print("seconds are medians per PPO step; opt_gen_ratio = optimisation time / generation time")
    print(load.report())
    _common.write_json(
        args.json, "bench_ppo", args, {"foreign_cpu_share": load.share(), "rows": rows}
    )


if __name__ == "__main__":
    main()
