"""Pairwise win rates with 95% confidence intervals, shared by `eval judge` and `eval human-import`.

Also the seeded coin that decides which answer is shown first, the mapping of a choice about the
shown order back to the models, and the report files (results.json, judgments.jsonl) that
`eval judge` and `eval human-import` both write.

Outcomes are from model A's side: "a" (A better), "b" (B better), "tie". Each rate gets a Wilson
score interval (Wilson, 1927), which, unlike the normal approximation, stays inside [0, 1] and is
sensible for small n and rates near 0 or 1. Unparsable or skipped judgments are counted but not
part of n.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile
OUTCOMES = ("a", "tie", "b")
RESULTS = "results.json"
JUDGMENTS = "judgments.jsonl"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_report(outcomes: Sequence[str | None]) -> dict[str, Any]:
    """Counts, rates and Wilson 95% intervals of A's wins, ties and losses.

    Args:
        outcomes: "a", "b", "tie", or None for a judgment that could not be read.

    Returns:
        {"n", "invalid", "a_wins", "ties", "b_wins", "win_rate", "tie_rate", "loss_rate",
        "score"}: each rate is {"value", "ci95": [lo, hi]}; score = (wins + ties / 2) / n.
    """
    c = Counter(o for o in outcomes if o in OUTCOMES)
    n = sum(c.values())

    def rate(k: int) -> dict[str, Any]:
        lo, hi = wilson(k, n)
        return {"value": k / n if n else None, "ci95": [lo, hi]}

    return {
        "n": n,
        "invalid": len(outcomes) - n,
        "a_wins": c["a"],
        "ties": c["tie"],
        "b_wins": c["b"],
        "win_rate": rate(c["a"]),
        "tie_rate": rate(c["tie"]),
        "loss_rate": rate(c["b"]),
        "score": (c["a"] + c["tie"] / 2) / n if n else None,
    }


def random_swaps(n: int, seed: int, salt: str) -> list[bool]:
    """Per item, whether B's answer is shown first: a fair coin from (seed, salt), reproducible."""
    rng = random.Random(f"{seed}:{salt}")
    return [rng.random() < 0.5 for _ in range(n)]


def shown_to_model(choice: str | None, swapped: bool) -> str | None:
    """Map a choice about the shown order ("first"/"second"/"tie") back to "a"/"b"/"tie"."""
    if choice == "tie":
        return "tie"
    if choice not in ("first", "second"):
        return None
    return ("b" if swapped else "a") if choice == "first" else ("a" if swapped else "b")


def position_bias(choices: Sequence[str | None]) -> float | None:
    """Share of decisive choices that went to the answer shown first (0.5 = no position bias)."""
    decisive = [c for c in choices if c in ("first", "second")]
    return sum(c == "first" for c in decisive) / len(decisive) if decisive else None


def pairwise_report(rows: Sequence[dict[str, Any]], choice_key: str = "verdict") -> dict[str, Any]:
    """Win rates of rows holding "winner", "order" ("ab"/"ba") and the choice about the shown
    order (`choice_key`), plus the order counts and the measured position bias."""
    return {
        **win_report([r["winner"] for r in rows]),
        "order": {o: sum(r["order"] == o for r in rows) for o in ("ab", "ba")},
        "first_shown_won": position_bias([r[choice_key] for r in rows]),
    }


def write_report(directory: Path, results: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
    """results.json and judgments.jsonl."""
    (directory / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with open(directory / JUDGMENTS, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def summary_stats(results: dict[str, Any]) -> dict[str, Any]:
    """The manifest's flat stats: counts, each rate with its interval, position bias."""
    out: dict[str, Any] = {k: results[k] for k in ("a_wins", "ties", "b_wins", "invalid")}
    for k in ("win_rate", "tie_rate", "loss_rate"):
        out[k] = results[k]["value"]
        out[f"{k}_ci95"] = results[k]["ci95"]
    out["first_shown_won"] = results["first_shown_won"]
    return out


def read_results(directory: Path) -> dict[str, Any]:
    """The results.json of a judge or human-import artifact."""
    return json.loads((Path(directory) / RESULTS).read_text(encoding="utf-8"))
