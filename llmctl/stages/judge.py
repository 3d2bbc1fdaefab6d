"""eval judge: two checkpoints + prompts -> eval artifact with A's win/tie/loss rates against B.

Both checkpoints answer every prompt through the chat template (core/completions.chat_answers,
batched KV-cache sampling, one seed). The judge is either a reward-model checkpoint (`--judge-rm`:
higher reward wins, a difference within `--tie-epsilon` is a tie) or an OpenAI-compatible chat
endpoint (`--judge-url` + `--judge-model`, MT-Bench's pairwise prompt; core/judges.py). Which
answer is shown first is a seeded coin flip per prompt, recorded with each judgment, so a judge
that prefers the first position helps both models equally; the share of decisive verdicts won by
the first-shown answer is reported as the measured position bias. Rates come with Wilson 95%
intervals (core/winrate.py). Writes results.json and judgments.jsonl (prompt, both answers, order,
verdict, winner, rewards or the judge's reply).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.chatdata import load_prompts
from llmctl.core.completions import answer_both, question_text
from llmctl.core.config import require, to_dict
from llmctl.core.errors import InputError
from llmctl.core.judges import HttpJudge, RewardJudge, Verdict
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig
from llmctl.core.winrate import (
    pairwise_report,
    random_swaps,
    shown_to_model,
    summary_stats,
    write_report,
)


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Settings of `llmctl eval judge`."""

    judge_rm: str = ""  # reward-model checkpoint as the judge
    judge_url: str = ""  # or: base URL of an OpenAI-compatible API (.../v1)
    judge_model: str = ""  # the model name to ask at judge_url
    api_key_env: str = ""  # environment variable holding the endpoint's API key (never stored)
    tie_epsilon: float = 0.0  # reward-model judge: |reward A - reward B| <= this is a tie
    max_new_tokens: int = 128  # tokens per answer
    temperature: float = 0.7  # answer sampling (0 = greedy)
    top_p: float = 0.95
    limit: int = 0  # first N prompts only (0 = all)
    batch_size: int = 16  # answers generated per forward pass
    timeout_s: float = 60.0  # per judge request
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0  # answer sampling and answer order

    def __post_init__(self) -> None:
        require(
            bool(self.judge_rm) != bool(self.judge_url),
            "pass exactly one judge: --judge-rm RM_CKPT or --judge-url URL --judge-model NAME",
        )
        require(
            not self.judge_url or bool(self.judge_model), "--judge-url needs --judge-model NAME"
        )
        require(self.tie_epsilon >= 0, f"--tie-epsilon must be >= 0, got {self.tie_epsilon}")
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _ = self.sampling

    @property
    def sampling(self) -> SamplingConfig:
        """How answers are sampled."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=0,
            top_p=self.top_p,
        )


def make_judge(cfg: JudgeConfig) -> RewardJudge | HttpJudge:
    """The judge the config names (the API key read from its variable now, to fail early).

    Raises:
        InputError: The key variable is unset, or the reward model does not load.
    """
    if cfg.judge_rm:
        device = str(Runtime.detect(cfg.device, cfg.precision).device)
        return RewardJudge(Path(cfg.judge_rm), device=device, epsilon=cfg.tie_epsilon)
    key = None
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise InputError(
                f"environment variable {cfg.api_key_env} (--api-key-env) is not set",
                f"export {cfg.api_key_env}=... first",
            )
    return HttpJudge(cfg.judge_url, cfg.judge_model, api_key=key, timeout_s=cfg.timeout_s)


def judge_answers(
    conversations: Sequence[Sequence[dict[str, str]]],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    judge: RewardJudge | HttpJudge,
    *,
    seed: int = 0,
    progress: Progress = SILENT,
) -> list[dict[str, Any]]:
    """Judge every pair with a random shown order; one record per prompt."""
    swaps = random_swaps(len(conversations), seed, "judge/order")
    rows: list[dict[str, Any]] = []
    for i, (msgs, a, b, swap) in enumerate(
        zip(conversations, answers_a, answers_b, swaps, strict=True)
    ):
        rows.append(
            {
                "index": i,
                "prompt": question_text(msgs),
                "answer_a": a,
                "answer_b": b,
                "order": "ba" if swap else "ab",
            }
        )
    progress.start("judge", len(rows), "prompts")
    if isinstance(judge, RewardJudge):
        ra = judge.scores(conversations, answers_a)
        rb = judge.scores(conversations, answers_b)
        for row, x, y in zip(rows, ra, rb, strict=True):
            first, second = (y, x) if row["order"] == "ba" else (x, y)
            _record(row, judge.verdict(first, second))
            row |= {"reward_a": x, "reward_b": y}
        progress.advance(len(rows))
    else:
        for row in rows:
            shown = (row["answer_b"], row["answer_a"]) if row["order"] == "ba" else (
                row["answer_a"], row["answer_b"])  # fmt: skip
            verdict, reply = judge.judge(row["prompt"], *shown)
            _record(row, verdict)
            row["judge_reply"] = reply
            progress.advance(1)
    progress.stop()
    return rows


def _record(row: dict[str, Any], verdict: Verdict) -> None:
    row["verdict"] = verdict  # about the shown order: first, second, tie (None = unreadable)
    row["winner"] = shown_to_model(verdict, row["order"] == "ba")


def run(
    prompts: str | Path,
    ckpt_a: Path,
    ckpt_b: Path,
    dst: Path,
    cfg: JudgeConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Answer the prompts with both checkpoints, judge each pair, write the win-rate report.

    Raises:
        InputError: Unreadable prompts, a bad checkpoint or reward model, an unset key variable,
            an unreachable or non-OpenAI judge endpoint.
    """
    check_output(dst, force)
    judge = make_judge(cfg)
    items, _ = load_prompts(prompts)
    items = items[: cfg.limit] if cfg.limit else items
    if not items:
        raise InputError(f"{prompts} holds no prompts", "pass a file with a 'prompt' column")
    convs = [p.messages for p in items]
    answers_a, answers_b = answer_both(
        ckpt_a, ckpt_b, convs, cfg.sampling, device=cfg.device, precision=cfg.precision,
        seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    rows = judge_answers(convs, answers_a, answers_b, judge, seed=cfg.seed, progress=progress)
    results = {
        **pairwise_report(rows),
        "a": str(ckpt_a),
        "b": str(ckpt_b),
        "judge": cfg.judge_rm or f"{cfg.judge_model} @ {cfg.judge_url}",
    }
    inputs = [input_record(prompts, "prompts"), input_record(ckpt_a, "checkpoint")]
    inputs += [input_record(ckpt_b, "checkpoint")]
    if cfg.judge_rm:
        inputs.append(input_record(cfg.judge_rm, "checkpoint"))
    with commit_output(
        dst, kind="eval", stage="eval-judge", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        write_report(out.path, results, rows)
        out.manifest.counts = {"prompts": len(rows), "judged": results["n"]}
        out.manifest.stats = summary_stats(results)
    return out.manifest
