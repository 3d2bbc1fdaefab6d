"""The embedded post-training data: chats, preference pairs and RL prompts from real stdlib text.

Where the text comes from: the running interpreter's standard library, read offline, as
`llmctl corpus` reads it for pretraining.
    docstrings  the public functions, classes and methods of the public stdlib modules, parsed with
                `ast` (no import, so nothing runs): the docstring's first prose paragraph (cleaned,
                at most ~400 characters, cut at a sentence end) and the signature rendered from the
                `def` (for a class, from its `__init__`)
    topics      the documentation topics that `help()` shows (`pydoc_data.topics`): the opening prose
                paragraphs, without headings and grammar blocks

How each set is derived: every subject (`json.dumps`, `textwrap.TextWrapper.wrap`, `topics:assert`)
goes to exactly one set by a hash of its qualified name (`split_of`: 80% chat, 10% prefs, 10%
prompts). The hash ignores the seed, so preference pairs and RL prompts stay held out from SFT
whatever seeds the three sets were built with. Each subject gives one row; the seed, mixed with the
set and the subject, picks templates, so a row does not change when `--max-docs` cuts the set.
    chat     a question from varied user templates and its answer from the text: what it does (the
             docstring), its parameters (the signature), which module provides it (only for names
             defined once in the stdlib and not builtins), or two turns (what, then a follow-up);
             ~20% start with one of a few fixed system prompts
    prefs    one question; chosen = its answer; rejected = a plausibly worse answer, recorded in
             `rejected_kind`: `mismatch` (the answer to the same question about another subject of
             the prefs set), `shuffled` (the answer's words shuffled) or `truncated` (cut off
             mid-sentence); chosen != rejected and neither is empty
    prompts  one question and the correct answer as `reference`

Output is byte-identical for the same seed and Python version (files are visited in sorted order).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import pyarrow as pa

Split = Literal["chat", "prefs", "prompts"]
SPLITS: dict[Split, tuple[int, int]] = {"chat": (0, 80), "prefs": (80, 90), "prompts": (90, 100)}
MAX_ANSWER = 400  # characters of docstring or topic prose in one answer
# Programs shipped in the stdlib tree rather than library modules.
SKIP_PACKAGES = {
    "idlelib",
    "turtledemo",
    "lib2to3",
    "pydoc_data",
    "ensurepip",
    "this",
    "antigravity",
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant who knows the Python standard library well. Answer concisely.",
    "You are a Python expert. Answer questions about the standard library accurately and briefly.",
)
SYSTEM_FRACTION = 0.2
WHAT = (
    "What does `{q}` do?",
    "Explain `{q}`.",
    "What is `{q}` for?",
    "Can you briefly describe `{q}` from the Python standard library?",
    "I came across `{q}` in some code. What does it do?",
    "In Python, what is the purpose of `{q}`?",
    "Give me a one-paragraph summary of `{q}`.",
    "what does {q} do",
)
PARAMS = (
    "What are the parameters of `{q}`?",
    "What is the signature of `{q}`?",
    "How do I call `{q}`? Which arguments does it take?",
    "Which arguments does `{q}` accept?",
    "Show me the call signature of `{q}`.",
    "what args does {q} take",
)
MODULE = (
    "Which module provides `{n}`?",
    "Where does `{n}` live in the Python standard library?",
    "What do I need to import to use `{n}`?",
    "Which stdlib module should I import `{n}` from?",
    "which module is {n} in",
)
TOPIC = (
    "Explain {t} in Python.",
    "What does the Python language reference say about {t}?",
    "Tell me about {t} in Python.",
    "Give me a short overview of {t}, as the Python docs describe it.",
)
FOLLOW_PARAMS = ("And what arguments does it take?", "How do I call it?", "What's its signature?")
FOLLOW_MODULE = ("Which module do I import it from?", "Where is it defined?")

SCHEMAS = {
    "chat": pa.schema(
        [
            ("id", pa.string()),
            (
                "messages",
                pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
            ),
            ("source", pa.string()),
            ("text", pa.string()),
        ]
    ),
    "prefs": pa.schema(
        [(c, pa.string()) for c in ("id", "prompt", "chosen", "rejected", "rejected_kind")]
        + [("text", pa.string()), ("source", pa.string())]
    ),
    "prompts": pa.schema(
        [(c, pa.string()) for c in ("id", "prompt", "reference", "text", "source")]
    ),
}


@dataclass(frozen=True)
class Param:
    """One parameter of a signature, as written in the `def`."""

    shown: str  # as in the signature: "width=70", "*args", "x: int"
    name: str  # "width", "*args", "**kwargs"
    default: str | None
    note: str  # "", "positional-only" or "keyword-only"


@dataclass(frozen=True)
class Subject:
    """A thing questions are asked about: a stdlib function, class or method, or a topic."""

    qualname: str  # json.dumps, textwrap.TextWrapper.wrap, topics:assert
    kind: Literal["function", "class", "method", "topic"]
    module: str  # "" for topics
    name: str  # dumps, TextWrapper.wrap, or the topic's title
    summary: str
    params: tuple[Param, ...] | None = None  # None when no signature is known

    @property
    def source(self) -> str:
        """The `source` column: where the answer text comes from."""
        return self.qualname if self.kind == "topic" else f"docstrings:{self.qualname}"


def split_of(qualname: str) -> Split:
    """The set a subject belongs to, by a stable hash of its qualified name (seed-independent)."""
    bucket = int.from_bytes(hashlib.sha256(qualname.encode()).digest()[:8], "big") % 100
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


# -- reading the text ----------------------------------------------------------------------------


def public_module(module: str) -> bool:
    """A stdlib module whose names users import (no `_private` part, not an application)."""
    parts = module.split(".")
    return parts[0] not in SKIP_PACKAGES and not any(p.startswith("_") for p in parts)


def unique_names(modules: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Top-level def/class names defined in exactly one public module and not builtins, so that
    "which module provides X?" has one answer."""
    seen: dict[str, set[str]] = {}
    for module, code in modules:
        if public_module(module):
            for m in re.finditer(r"^(?:async\s+def|def|class)\s+(\w+)", code, re.MULTILINE):
                seen.setdefault(m.group(1), set()).add(module)
    return frozenset(n for n, ms in seen.items() if len(ms) == 1 and n not in vars(builtins))


def stdlib_subjects(modules: Iterable[tuple[str, str]]) -> Iterator[Subject]:
    """Subjects of the public modules, in input order: top-level functions and classes, then
    each class's methods, all public and documented."""
    for module, code in modules:
        if not public_module(module):
            continue
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            continue
        seen: set[str] = set()
        for node in tree.body:
            for sub in _node_subjects(node, module):
                if sub.qualname not in seen:  # a name defined twice: keep the first
                    seen.add(sub.qualname)
                    yield sub


def _node_subjects(node: ast.stmt, module: str) -> Iterator[Subject]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return
    if node.name.startswith("_"):
        return
    summary = docstring_summary(ast.get_docstring(node) or "", node.name)
    if isinstance(node, ast.ClassDef):
        init = next(
            (
                n
                for n in node.body
                if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "__new__")
            ),
            None,
        )
        params = _params(init.args, drop_first=True) if init else None
        if summary:
            yield Subject(f"{module}.{node.name}", "class", module, node.name, summary, params)
        for m in node.body:
            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith(
                "_"
            ):
                s = docstring_summary(ast.get_docstring(m) or "", m.name)
                if s:
                    static = any(_is_name(d, "staticmethod") for d in m.decorator_list)
                    name = f"{node.name}.{m.name}"
                    p = _params(m.args, drop_first=not static)
                    yield Subject(f"{module}.{name}", "method", module, name, s, p)
    elif summary:
        params = _params(node.args, drop_first=False)
        yield Subject(f"{module}.{node.name}", "function", module, node.name, summary, params)


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _params(args: ast.arguments, *, drop_first: bool) -> tuple[Param, ...]:
    """The parameters of a `def`, without self/cls for methods, defaults and annotations as
    written (long defaults shortened)."""
    positional = [*args.posonlyargs, *args.args]
    # Defaults align with the last positional parameters.
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += args.defaults
    out: list[Param] = []
    for i, (a, d) in enumerate(zip(positional, defaults, strict=True)):
        if drop_first and i == 0:
            continue
        note = "positional-only" if i < len(args.posonlyargs) else ""
        out.append(_param(a, d, note))
    if args.vararg:
        out.append(_param(args.vararg, None, "", "*"))
    for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out.append(_param(a, d, "keyword-only"))
    if args.kwarg:
        out.append(_param(args.kwarg, None, "", "**"))
    return tuple(out)


def _param(a: ast.arg, default: ast.expr | None, note: str, star: str = "") -> Param:
    name = star + a.arg
    shown = name + (f": {ast.unparse(a.annotation)}" if a.annotation else "")
    d = None
    if default is not None:
        d = ast.unparse(default)
        d = d if len(d) <= 40 else d[:37] + "..."
        shown += f" = {d}" if a.annotation else f"={d}"
    return Param(shown, name, d, note)


def signature(params: tuple[Param, ...]) -> str:
    """The parameter list as written, with the `/` and `*` markers put back."""
    out: list[str] = []
    for i, p in enumerate(params):
        prev = params[i - 1] if i else None
        if prev and prev.note == "positional-only" and p.note != "positional-only":
            out.append("/")
        after_star = prev is not None and (prev.note == "keyword-only" or prev.name[0] == "*")
        if p.note == "keyword-only" and not after_star:
            out.append("*")  # keyword-only parameters without a *args before them
        out.append(p.shown)
    if params and params[-1].note == "positional-only":
        out.append("/")
    return ", ".join(out)


_SENTENCE_END = re.compile(r"[.!?][)\"'”]?$")


def docstring_summary(doc: str, name: str) -> str:
    """The first prose paragraph of a docstring, on one line, capped at MAX_ANSWER characters;
    "" when there is none (signature lines like `name(a, b) -> c` and doctests are skipped)."""
    for para in re.split(r"\n\s*\n", doc.strip()):
        text = " ".join(para.split())
        if not text or text.startswith(">>>") or re.match(rf"{re.escape(name)}\s*\(", text):
            continue
        text = re.sub(r"``([^`]+)``", r"`\1`", text)
        text = re.sub(r":\w+(?::\w+)?:`~?([^`]+)`", r"`\1`", text)  # :attr:`x` -> `x`
        return _finish(text)
    return ""


def topic_subjects(topics: Mapping[str, str]) -> Iterator[Subject]:
    """One subject per `pydoc_data.topics` entry, sorted by key: its title and opening prose."""
    for key in sorted(topics):
        lines = topics[key].strip().splitlines()
        if len(lines) < 3:
            continue
        title, prose = lines[0].strip(), []
        for para in re.split(r"\n\s*\n", "\n".join(lines[2:])):
            plines = para.strip("\n").splitlines()
            if not plines or plines[0].startswith(" ") or re.search(r"^[*=~^-]{3,}$", para, re.M):
                continue  # a grammar/code block or a heading
            text = " ".join(para.split())
            if text.startswith(("New in version", "Changed in version", "Deprecated since")):
                continue
            text = re.sub(r"\*\*?([^*\s][^*]*?)\*\*?", r"\1", text)  # *emphasis*, **PEP 8**
            text = text[:-1] + "." if text.endswith(":") else text
            if _SENTENCE_END.search(text):
                prose.append(text)
            if sum(len(p) for p in prose) >= MAX_ANSWER // 2:
                break
        summary = _finish(" ".join(prose))
        if summary:
            t = title[0].lower() + title[1:] if not title[1:2].isupper() else title
            yield Subject(f"topics:{key}", "topic", "", t, summary)


def _finish(text: str) -> str:
    """Cap at MAX_ANSWER at a sentence end (at a word, with "...", when there is none); a
    trailing colon becomes a full stop; "" when too short to be an answer."""
    if len(text) > MAX_ANSWER:
        cut = max(text.rfind(". ", 0, MAX_ANSWER), text.rfind("? ", 0, MAX_ANSWER))
        if cut > MAX_ANSWER // 4:
            text = text[: cut + 1]
        else:
            text = text[: text.rfind(" ", 0, MAX_ANSWER - 3)].rstrip(",;:") + "..."
    if text.endswith(":"):
        text = text[:-1] + "."
    return text if len(text) >= 20 and len(text.split()) >= 3 else ""


# -- questions and answers -----------------------------------------------------------------------


def _kinds(sub: Subject, unique: frozenset[str]) -> list[str]:
    """The question kinds a subject can answer."""
    if sub.kind == "topic":
        return ["what"]
    kinds = ["what"]
    if sub.params is not None:
        kinds.append("params")
    if sub.kind in ("function", "class") and sub.name in unique:
        kinds.append("module")
    return kinds


def _question(kind: str, sub: Subject, rng: random.Random) -> str:
    if sub.kind == "topic":
        return rng.choice(TOPIC).format(t=sub.name)
    templates = {"what": WHAT, "params": PARAMS, "module": MODULE}[kind]
    return rng.choice(templates).format(q=sub.qualname, n=sub.name)


def answer(kind: str, sub: Subject) -> str:
    """The correct answer to a question of `kind` about `sub`, from the stdlib's own text."""
    if kind == "what":
        return sub.summary
    if kind == "module":
        what = "a class" if sub.kind == "class" else "a function"
        return (
            f"`{sub.name}` is {what} in the `{sub.module}` module; "
            f"import it with `from {sub.module} import {sub.name}`."
        )
    assert sub.params is not None
    call = f"{sub.module}.{sub.name}({signature(sub.params)})"
    if not sub.params:
        return f"`{call}` takes no arguments."
    lines = [f"The call signature is `{call}`.", "", "Parameters:"]
    for p in sub.params:
        if p.name.startswith("**"):
            desc = "any extra keyword arguments"
        elif p.name.startswith("*"):
            desc = "any number of extra positional arguments"
        else:
            desc = "required" if p.default is None else f"default `{p.default}`"
        lines.append(f"- `{p.name}` ({', '.join(x for x in (p.note, desc) if x)})")
    return "\n".join(lines)


def _rng(seed: int, split: Split, sub: Subject) -> random.Random:
    # A string seed goes through sha512: stable across runs and PYTHONHASHSEED.
    return random.Random(f"{seed}/{split}/{sub.qualname}")


def chat_row(sub: Subject, seed: int, unique: frozenset[str]) -> dict:
    """One conversation about `sub`: optional system message, then user/assistant turns."""
    rng = _rng(seed, "chat", sub)
    kinds = _kinds(sub, unique)
    messages = []
    if rng.random() < SYSTEM_FRACTION:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    followups = [k for k in kinds if k != "what"]
    weights = {"what": 0.45, "params": 0.25, "module": 0.15}
    if followups and rng.random() < 0.2:  # two turns: what it does, then a follow-up
        follow = rng.choice(followups)
        messages += [
            {"role": "user", "content": _question("what", sub, rng)},
            {"role": "assistant", "content": answer("what", sub)},
            {
                "role": "user",
                "content": rng.choice(FOLLOW_PARAMS if follow == "params" else FOLLOW_MODULE),
            },
            {"role": "assistant", "content": answer(follow, sub)},
        ]
        turns = f"what+{follow}"
    else:
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        messages += [
            {"role": "user", "content": _question(kind, sub, rng)},
            {"role": "assistant", "content": answer(kind, sub)},
        ]
        turns = kind
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return {
        "id": f"chat/{sub.qualname}/{turns}",
        "messages": messages,
        "source": sub.source,
        "text": text,
    }


def prompt_row(sub: Subject, seed: int, unique: frozenset[str]) -> dict:
    """One RL prompt about `sub` with its reference answer."""
    rng = _rng(seed, "prompts", sub)
    kind = rng.choice(_kinds(sub, unique))
    q = _question(kind, sub, rng)
    return {
        "id": f"prompts/{sub.qualname}/{kind}",
        "prompt": q,
        "reference": answer(kind, sub),
        "text": q,
        "source": sub.source,
    }


def pref_rows(subs: list[Subject], seed: int, unique: frozenset[str]) -> Iterator[dict]:
    """One preference pair per subject; mismatched answers come from the other subjects in `subs`."""
    for i, sub in enumerate(subs):
        rng = _rng(seed, "prefs", sub)
        kind = rng.choice(_kinds(sub, unique))
        q, chosen = _question(kind, sub, rng), answer(kind, sub)
        ways = ["mismatch", "shuffled", "truncated"]
        rng.shuffle(ways)
        for way in ways:
            rejected = _reject(way, kind, chosen, subs, i, rng, unique)
            if rejected and rejected != chosen:
                yield {
                    "id": f"prefs/{sub.qualname}/{kind}",
                    "prompt": q,
                    "chosen": chosen,
                    "rejected": rejected,
                    "rejected_kind": way,
                    "text": q,
                    "source": sub.source,
                }
                break


def _reject(
    way: str,
    kind: str,
    chosen: str,
    subs: list[Subject],
    i: int,
    rng: random.Random,
    unique: frozenset[str],
) -> str:
    """A worse answer than `chosen`, or "" when this way cannot make one."""
    words = chosen.split()
    if way == "shuffled":
        if len(set(words)) < 4:
            return ""
        rng.shuffle(words)
        return " ".join(words)
    if way == "truncated":
        if len(words) < 6:
            return ""
        # cut after a word between a quarter and two thirds of the way, keeping line breaks
        gaps = [m.start() for m in re.finditer(r"\s+", chosen)]
        cut = gaps[rng.randint(max(1, len(words) // 4), len(words) * 2 // 3) - 1]
        return chosen[:cut].rstrip(".,;:!? \n")
    # mismatch: the answer to the same kind of question about another subject, looked for from a
    # random start so that partners differ
    start = rng.randrange(len(subs))
    for j in range(len(subs)):
        other = subs[(start + j) % len(subs)]
        if (start + j) % len(subs) != i and kind in _kinds(other, unique):
            a = answer(kind, other)
            if a != chosen:
                return a
    return ""


def build_rows(
    split: Split,
    subjects: Iterable[Subject],
    *,
    seed: int,
    unique: frozenset[str],
    limit: int = 0,
) -> Iterator[dict]:
    """The rows of one set: the subjects that `split_of` assigns to it, in input order, at most
    `limit` (0 = all). Stops reading `subjects` once the limit is reached."""
    mine = (s for s in subjects if split_of(s.qualname) == split)
    if limit:
        mine = islice(mine, limit)
    if split == "prefs":
        yield from pref_rows(list(mine), seed, unique)
    else:
        make = chat_row if split == "chat" else prompt_row
        for s in mine:
            yield make(s, seed, unique)
