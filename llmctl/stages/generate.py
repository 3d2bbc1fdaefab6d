"""generate: checkpoint + prompt -> text, streamed as it is sampled.

Thin over core/sampling.py (the KV-cache generator that eval, ppo and chat reuse): load the
checkpoint, encode the prompt with BOS, sample, decode incrementally (whole UTF-8 characters only),
stop at EOS or the token budget. `--chat` wraps the prompt in the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.config import require
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig, stream


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Settings of `llmctl generate`."""

    max_new_tokens: int = 200  # tokens to sample at most
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    num_samples: int = 1  # independent samples of the same prompt (one batch)
    chat: bool = False  # wrap the prompt as a user turn of the chat template
    system: str | None = None  # system message (with --chat)
    device: str = "auto"  # auto, cpu, cuda, mps
    seed: int = 0  # sampling seed

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling part."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


def run(ckpt: Path, prompt: str, cfg: GenerateConfig) -> Iterator[tuple[int, str]]:
    """Yield (sample index, text piece) as tokens are produced.

    Raises:
        InputError: The checkpoint is missing, incomplete or inconsistent.
    """
    rt = Runtime.detect(cfg.device, "fp32")
    c = load_checkpoint(ckpt, device=rt.device, inference=cfg.num_samples == 1)
    tok = c.tokenizer
    if cfg.chat:
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids, _ = tok.render_chat(msgs, add_generation_prompt=True)
        stops = [tok.eos_id, tok.end_id]
    else:
        ids = tok.encode(prompt, bos=True)
        stops = [tok.eos_id]
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    n = cfg.num_samples
    held: list[list[int]] = [[] for _ in range(n)]
    emitted = [""] * n
    for step in stream(
        c.model, [ids] * n, cfg.sampling, stop_ids=stops, generator=gen, pad_id=tok.pad_id
    ):
        for i, t in enumerate(step):
            if t is None or t in stops:
                continue
            held[i].append(t)
            text = tok.decode(held[i])
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                continue
            if len(text) > len(emitted[i]):
                yield i, text[len(emitted[i]) :]
            emitted[i] = text
