"""llmctl checkpoints as an lm-evaluation-harness model: `lm_eval --model llmctl`.

`LlmctlLM` implements lm-eval's three request types on top of llmctl's own code paths:

    loglikelihood          (context, continuation) -> (sum log p(continuation), is_greedy), through
                           core/scoring.py: batched, longest first, identical requests computed once
    loglikelihood_rolling  (text,) -> sum log p(text): BOS + text cut into `rolling_spans`, the same
                           spans and numbers as `llmctl eval ppl` on that text
    generate_until         (context, {"until": [...], "max_gen_toks": N, ...}) -> text, through the
                           KV-cache generator (core/sampling.py); greedy unless do_sample is set;
                           stops at EOS, at the first stop string (cut off), or after N tokens

Tokenisation follows lm-eval's Hugging Face model with one departure. As there, whitespace at the
end of the context moves to the start of the continuation ("Answer: " + "Paris" is scored as
"Answer:" + " Paris"), because word pieces carry their leading space. Unlike there, context and
continuation are encoded separately rather than encoded whole and split: the llmctl tokenizer has
no dummy prefix and never merges across whitespace, so " Paris" encodes alike either way, and the
scored ids are exactly the continuation's own. Every sequence starts with BOS, as every training
document does; an empty context is just BOS.

Registering the name "llmctl" happens when this module is imported (lm-eval 0.4.13 has no plugin
discovery for models), so `llmctl lm-eval ...` imports it before handing over to lm-eval's CLI.
lm-eval's own model registry is filled first, so `--model hf` keeps working alongside.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - fills lm-eval's registry before ours is added
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmctl.core.checkpoint import Checkpoint, load_checkpoint
from llmctl.core.errors import ConfigError
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig, stream
from llmctl.core.scoring import Span, continuation_span, rolling_spans, score_spans
from llmctl.core.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DEFAULT_BATCH = 8
DEFAULT_GEN_TOKS = 256


@register_model("llmctl")
class LlmctlLM(LM):
    """An llmctl checkpoint behind lm-eval's `LM` interface.

    Args:
        path: Checkpoint directory (what `--model_args path=CKPT` passes).
        checkpoint: An already loaded checkpoint instead of `path`.
        batch_size: Requests per forward pass ("auto" falls back to 8).
        device: auto, cpu, cuda, cuda:N, mps.
        precision: auto, fp32 or bf16 (autocast; weights stay fp32).
        stride: Sliding-window stride of `loglikelihood_rolling` (default: the full context).
        max_gen_toks: Default generation budget when a task sets none.
        seed: Seed of sampled generation (do_sample=True).
        **kwargs: Other lm-eval arguments (max_batch_size, ...), ignored with a log line.

    Raises:
        ConfigError: Neither or both of path and checkpoint, or a bad value.
        InputError: The checkpoint is missing, incomplete or inconsistent.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        checkpoint: Checkpoint | None = None,
        batch_size: int | str | None = None,
        device: str | None = None,
        precision: str = "auto",
        stride: int | None = None,
        max_gen_toks: int = DEFAULT_GEN_TOKS,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if (path is None) == (checkpoint is None):
            raise ConfigError(
                "the llmctl lm-eval model needs exactly one checkpoint",
                "pass --model_args path=CKPT",
            )
        unused = {k: v for k, v in kwargs.items() if v is not None}
        if unused:
            log.info("llmctl model ignores %s", ", ".join(sorted(unused)))
        self.rt = Runtime.detect(device or "auto", precision)  # type: ignore[arg-type]
        ckpt = checkpoint or load_checkpoint(Path(str(path)), device=self.rt.device)
        self.ckpt = ckpt
        self.model = ckpt.model.to(self.rt.device).eval()
        self.tok: Tokenizer = ckpt.tokenizer
        self.batch_size = _batch_size(batch_size)
        self.context = self.model.cfg.max_seq_len
        self.stride = int(stride) if stride else self.context
        if not 1 <= self.stride <= self.context:
            raise ConfigError(f"stride must be in [1, {self.context}], got {self.stride}")
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = self.rt.device

    # -- lm-eval's interface ------------------------------------------------------------------

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> LlmctlLM:
        """Build from `--model_args` plus lm-eval's own flags; model_args win on a clash (lm-eval
        passes both, and its CLI's default --device is cuda:0 even on a CPU-only machine)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args = {**extra, **arg_dict}
        dev = str(args.get("device") or "auto")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            if "device" in arg_dict:
                raise ConfigError(f"device {dev} requested but CUDA is not available")
            args["device"] = "auto"  # lm-eval's default, not the user's choice
        return cls(**args)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> LlmctlLM:
        """`path=CKPT,batch_size=16,...` (lm-eval's `--model_args` string)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer in lm-eval's request caches."""
        return f"llmctl-{self.tok.fingerprint}"

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) per request."""
        pairs = [tuple(r.args[:2]) for r in requests]
        spans = [self.continuation_span(c, x) for c, x in pairs]
        out = [(s.logprob, s.greedy) for s in self._score(spans)]
        for pair, res in zip(pairs, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Sum log p(text) per request, BOS-conditioned, every token scored once."""
        texts = [r.args[0] for r in requests]
        per_text = [self.rolling_spans(t) for t in texts]
        scores = iter(self._score([s for spans in per_text for s in spans]))
        out = [sum(next(scores).logprob for _ in spans) for spans in per_text]
        for text, res in zip(texts, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Continue each context until a stop string, EOS or the token budget."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one sampling setup per group
            groups.setdefault(json.dumps(r.args[1] or {}, sort_keys=True, default=str), []).append(
                i
            )
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1] or {})
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            for a in range(0, len(idx), self.batch_size):
                batch = idx[a : a + self.batch_size]
                texts = self.generate([requests[i].args[0] for i in batch], kwargs)
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [t or "" for t in out]

    # -- the pieces, public for tests and other callers ---------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (with BOS) and continuation ids, trailing context whitespace moved over."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        return self.tok.encode(context, bos=True), self.tok.encode(continuation)

    def continuation_span(self, context: str, continuation: str) -> Span:
        """The span that scores `continuation` after `context`."""
        ctx, cont = self.encode_pair(context, continuation)
        return continuation_span(ctx, cont, self.context)

    def rolling_spans(self, text: str) -> list[Span]:
        """The spans that score all of `text` after BOS."""
        return rolling_spans(self.tok.encode(text, bos=True), self.context, self.stride)

    def generate(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[str]:
        """One batch of `generate_until` with one set of generation arguments."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        budget = max(1, min(budget, self.context // 2))
        sampled = (
            bool(gen_kwargs.get("do_sample")) and float(gen_kwargs.get("temperature", 1.0)) > 0
        )
        cfg = SamplingConfig(
            max_new_tokens=budget,
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(gen_kwargs.get("top_k") or 0),
            top_p=float(gen_kwargs.get("top_p") or 1.0),
        )
        keep = self.context - budget  # prompt tokens kept (from the end), leaving room to generate
        prompts = [self.tok.encode(c, bos=True)[-keep:] for c in contexts]
        gen = torch.Generator(device=self.rt.device).manual_seed(self.seed)
        held: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        with self.rt.autocast():
            for step in stream(
                self.model, prompts, cfg, stop_ids=[self.tok.eos_id], generator=gen,
                pad_id=self.tok.pad_id,
            ):  # fmt: skip
                for r, t in enumerate(step):
                    if t is None or done[r]:
                        continue
                    if t == self.tok.eos_id:
                        done[r] = True
                        continue
                    held[r].append(t)
                    if until and any(s in self.tok.decode(held[r]) for s in until):
                        done[r] = True
                if all(done):
                    break
        return [_cut(self.tok.decode(h), until) for h in held]

    def _score(self, spans: list[Span]) -> list[Any]:
        with self.rt.autocast():
            return score_spans(
                self.model, spans, batch_size=self.batch_size, pad_id=self.tok.pad_id
            )


def _cut(text: str, until: Sequence[str]) -> str:
    """Text before the first stop string (lm-eval's convention: the stop string is dropped)."""
    for s in until:
        if s:
            text = text.split(s, 1)[0]
    return text


def _batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"batch_size must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {value!r}")
    return n
