"""eval human-export / human-import: blind side-by-side rating sheets for people, and their results.

`export_sheets`: both checkpoints answer every prompt (core/completions.answer_both, as `eval
judge` does); each item shows its two answers as "Answer 1" and "Answer 2" in a seeded random order
under an opaque item id, with no model names. It writes
    raters/rate.html    one self-contained page (inline CSS and JS, no external resources): rate
                        each item 1 / tie / 2 (plus a comment), progress kept in the browser's
                        localStorage, "Download CSV" saves the ratings
    raters/ratings.csv  the same items as a spreadsheet with empty `rating` and `comment` columns
    key.json            item id -> prompt index, shown order, both answers, the checkpoints: keep
                        it away from raters
Send only raters/ to raters.

`import_ratings`: one or more filled CSVs (the page's download or the spreadsheet; columns
`item_id`, `rating`, optional `comment`; extra columns ignored) plus key.json -> the same win-rate
report as `eval judge` (core/winrate.py: Wilson 95% intervals, order counts, the raters' measured
position bias). Ratings: 1, 2, tie (also "=", "0", "t", "left", "right", case-insensitive); an empty
rating is skipped and counted; an unknown item id or rating value is an error naming the file and
row. Each CSV row counts as one judgment, so several raters simply add rows.
"""

from __future__ import annotations

import csv
import html
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.chatdata import load_prompts
from llmctl.core.completions import answer_both, question_text
from llmctl.core.config import require, to_dict
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress
from llmctl.core.sampling import SamplingConfig
from llmctl.core.winrate import (
    pairwise_report,
    random_swaps,
    shown_to_model,
    summary_stats,
    write_report,
)

KEY = "key.json"
RATERS = "raters"
PAGE = "rate.html"
SHEET = "ratings.csv"
RATINGS = {"1": "first", "left": "first", "2": "second", "right": "second"}
RATINGS |= {"tie": "tie", "t": "tie", "=": "tie", "0": "tie"}


@dataclass(frozen=True, kw_only=True)
class HumanExportConfig:
    """Settings of `llmctl eval human-export`."""

    max_new_tokens: int = 128  # tokens per answer
    temperature: float = 0.7  # answer sampling (0 = greedy)
    top_p: float = 0.95
    limit: int = 0  # first N prompts only (0 = all)
    batch_size: int = 16  # answers generated per forward pass
    title: str = "Which answer is better?"  # heading of the rating page
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0  # answer sampling, shown order and item ids

    def __post_init__(self) -> None:
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _ = self.sampling

    @property
    def sampling(self) -> SamplingConfig:
        """How answers are sampled."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=0,
            top_p=self.top_p,
        )  # fmt: skip


def export_sheets(
    prompts: str | Path,
    ckpt_a: Path,
    ckpt_b: Path,
    dst: Path,
    cfg: HumanExportConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Answer the prompts with both checkpoints and write the blind rating page, sheet and key.

    Raises:
        InputError: Unreadable prompts or a bad checkpoint.
    """
    check_output(dst, force)
    items, _ = load_prompts(prompts)
    items = items[: cfg.limit] if cfg.limit else items
    if not items:
        raise InputError(f"{prompts} holds no prompts", "pass a file with a 'prompt' column")
    convs = [p.messages for p in items]
    answers_a, answers_b = answer_both(
        ckpt_a, ckpt_b, convs, cfg.sampling, device=cfg.device, precision=cfg.precision,
        seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
    )  # fmt: skip
    swaps = random_swaps(len(convs), cfg.seed, "human/order")
    sheet_id = secrets.token_hex(4)  # names the page's saved progress in localStorage
    key: dict[str, Any] = {"a": str(ckpt_a), "b": str(ckpt_b), "sheet": sheet_id, "items": {}}
    shown = []
    for i, (msgs, a, b, swap) in enumerate(zip(convs, answers_a, answers_b, swaps, strict=True)):
        item_id = f"{sheet_id}-{i + 1:04d}"
        first, second = (b, a) if swap else (a, b)
        shown.append({"item_id": item_id, "prompt": question_text(msgs), "answer_1": first,
                      "answer_2": second})  # fmt: skip
        key["items"][item_id] = {"index": i, "order": "ba" if swap else "ab", "answer_a": a,
                                 "answer_b": b}  # fmt: skip
    inputs = [input_record(prompts, "prompts"), input_record(ckpt_a, "checkpoint")]
    inputs.append(input_record(ckpt_b, "checkpoint"))
    with commit_output(
        dst, kind="eval", stage="eval-human-export", config=to_dict(cfg), inputs=inputs,
        force=force,
    ) as out:  # fmt: skip
        (out.path / RATERS).mkdir()
        write_sheet(out.path / RATERS / SHEET, shown)
        page = render_page(shown, title=cfg.title, sheet_id=sheet_id)
        (out.path / RATERS / PAGE).write_text(page, encoding="utf-8")
        (out.path / KEY).write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n")
        out.manifest.counts = {"items": len(shown)}
        out.manifest.stats = {"swapped": sum(swaps), "sheet": sheet_id}
    return out.manifest


def write_sheet(path: Path, shown: Sequence[dict[str, str]]) -> None:
    """The raters' CSV: item_id, prompt, answer_1, answer_2, rating (empty), comment (empty)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "prompt", "answer_1", "answer_2", "rating", "comment"])
        for s in shown:
            w.writerow([s["item_id"], s["prompt"], s["answer_1"], s["answer_2"], "", ""])


def import_ratings(
    ratings: Sequence[Path],
    key_path: Path,
    dst: Path,
    *,
    force: bool = False,
) -> Manifest:
    """Map filled ratings back to the models through the key; write the win-rate report.

    Raises:
        InputError: A missing file or column, an item id the key does not know, a bad rating.
    """
    check_output(dst, force)
    key = _read_key(key_path)
    rows = []
    for path in ratings:
        for n, item_id, rating, comment in _read_ratings(Path(path)):
            item = key["items"].get(item_id)
            if item is None:
                raise InputError(
                    f"{path} row {n}: item {item_id!r} is not in {key_path}",
                    "pass the key.json written by the same `eval human-export`",
                )
            choice = _choice(rating, path, n)
            rows.append({"item_id": item_id, "index": item["index"], "order": item["order"],
                         "rating": rating, "choice": choice, "comment": comment,
                         "rater_file": str(path),
                         "winner": shown_to_model(choice, item["order"] == "ba")})  # fmt: skip
    results = {**pairwise_report(rows, "choice"), "a": key["a"], "b": key["b"], "judge": "human"}
    inputs = [input_record(p, "ratings") for p in ratings] + [input_record(key_path, "key")]
    with commit_output(
        dst, kind="eval", stage="eval-human-import", config={}, inputs=inputs, force=force
    ) as out:
        write_report(out.path, results, rows)
        out.manifest.counts = {"ratings": len(rows), "judged": results["n"]}
        out.manifest.stats = summary_stats(results)
    return out.manifest


def _read_key(path: Path) -> dict[str, Any]:
    try:
        key = json.loads(Path(path).read_text(encoding="utf-8"))
        _ = key["items"], key["a"], key["b"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"{path} is not a human-export key ({type(e).__name__}: {e})",
            "pass OUT/key.json from `llmctl eval human-export ... -o OUT`",
        ) from None
    return key


def _read_ratings(path: Path) -> list[tuple[int, str, str, str]]:
    """(row number, item id, rating, comment) per data row."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "item_id" not in cols or "rating" not in cols:
                raise InputError(
                    f"{path} needs columns item_id and rating (found: {', '.join(cols)})",
                    "use the CSV from rate.html's Download button or raters/ratings.csv",
                )
            return [
                (n, (r["item_id"] or "").strip(), (r["rating"] or "").strip(),
                 (r.get("comment") or "").strip())
                for n, r in enumerate(reader, start=2)
            ]  # fmt: skip
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read ratings {path} ({e})", "pass a UTF-8 CSV file") from None


def _choice(rating: str, path: Path, n: int) -> str | None:
    if not rating:
        return None  # not rated: counted as invalid, not as a tie
    choice = RATINGS.get(rating.lower())
    if choice is None:
        raise InputError(
            f"{path} row {n}: rating {rating!r} is not 1, 2 or tie",
            "rate 1 (answer 1 better), 2 (answer 2 better) or tie; leave empty to skip",
        )
    return choice


def render_page(shown: Sequence[dict[str, str]], *, title: str, sheet_id: str) -> str:
    """The self-contained rating page (all text HTML-escaped; no network access)."""
    items = "\n".join(_item_html(s) for s in shown)
    ids = json.dumps([s["item_id"] for s in shown]).replace("</", "<\\/")
    page = _PAGE.replace("@IDS@", ids).replace("@SHEET@", json.dumps(sheet_id))
    page = page.replace("@COUNT@", str(len(shown))).replace("@TITLE@", html.escape(title))
    return page.replace("@ITEMS@", items)  # last: answers may contain anything


def _item_html(s: dict[str, str]) -> str:
    i = html.escape(s["item_id"], quote=True)
    buttons = "".join(
        f'<label><input type="radio" name="r-{i}" value="{v}"> {text}</label>'
        for v, text in (("1", "1 is better"), ("tie", "tie"), ("2", "2 is better"))
    )
    return (
        f'<section class="item" data-id="{i}"><h2>{i}</h2>'
        f'<div class="prompt">{html.escape(s["prompt"])}</div>'
        f'<div class="pair"><div class="ans"><h3>Answer 1</h3><pre>{html.escape(s["answer_1"])}'
        f'</pre></div><div class="ans"><h3>Answer 2</h3><pre>{html.escape(s["answer_2"])}</pre>'
        f'</div></div><div class="rate">{buttons}'
        f'<input class="comment" type="text" placeholder="comment (optional)"></div></section>'
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1rem;color:#222}
header{position:sticky;top:0;background:#fff;padding:.5rem 0;border-bottom:1px solid #ccc}
.item{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.75rem}
.item.done{border-color:#4a4}.item h2{font-size:.8rem;color:#888;margin:0}
.prompt{white-space:pre-wrap;font-weight:600;margin:.5rem 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
.ans pre{white-space:pre-wrap;background:#f6f6f6;padding:.5rem;margin:0;min-height:3rem}
.ans h3{font-size:.9rem;margin:.25rem 0}.rate{margin-top:.5rem}.rate label{margin-right:1rem}
.comment{width:40%}button{font-size:1rem}
</style></head><body>
<header><h1>@TITLE@</h1>
<p>For each prompt, pick the better answer (or tie). The answers come from two systems in a random
order. Your choices are kept in this browser; press <b>Download CSV</b> when done and send the
file back. <span id="progress"></span> <button id="download">Download CSV</button></p></header>
@ITEMS@
<script>
(function () {
  var IDS = @IDS@, SHEET = @SHEET@, store = "llmctl-rating-" + SHEET;
  var saved = {};
  try { saved = JSON.parse(localStorage.getItem(store) || "{}"); } catch (e) { saved = {}; }
  function item(id) { return document.querySelector('section[data-id="' + id + '"]'); }
  function read() {
    var out = {};
    IDS.forEach(function (id) {
      var s = item(id), r = s.querySelector("input[type=radio]:checked");
      out[id] = {rating: r ? r.value : "", comment: s.querySelector(".comment").value};
      s.classList.toggle("done", !!r);
    });
    return out;
  }
  function update() {
    var all = read(), n = 0;
    IDS.forEach(function (id) { if (all[id].rating) n++; });
    document.getElementById("progress").textContent = n + " of @COUNT@ rated.";
    try { localStorage.setItem(store, JSON.stringify(all)); } catch (e) {}
  }
  IDS.forEach(function (id) {
    var s = item(id), v = saved[id] || {};
    s.querySelectorAll("input[type=radio]").forEach(function (r) {
      if (r.value === v.rating) r.checked = true;
    });
    s.querySelector(".comment").value = v.comment || "";
  });
  function q(x) { return '"' + String(x).replace(/"/g, '""') + '"'; }
  document.addEventListener("change", update);
  document.addEventListener("input", update);
  document.getElementById("download").addEventListener("click", function () {
    var all = read(), lines = ["item_id,rating,comment"];
    IDS.forEach(function (id) {
      lines.push([q(id), q(all[id].rating), q(all[id].comment)].join(","));
    });
    var blob = new Blob([lines.join("\\r\\n") + "\\r\\n"], {type: "text/csv"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "ratings-" + SHEET + ".csv";
    document.body.appendChild(a); a.click(); a.remove();
  });
  update();
})();
</script></body></html>
"""
