"""Word error rate with the same normalisation on both sides (used by tests and benchmarks)."""

from __future__ import annotations

import re

import jiwer

_NUMBERS = {
    "0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
    "7": "seven", "8": "eight", "9": "nine", "10": "ten", "12": "twelve", "30": "thirty",
}  # fmt: skip


def normalize(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w.strip("'") for w in words if w.strip("'"))


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp or "<empty>"))


def one_point(reference: str) -> float:
    """The tolerance of "within one point of WER": 0.01, or one word where the reference has fewer than
    100 (a resolution finer than one word cannot be measured on a short recording)."""
    return max(0.01, 1.0 / max(1, len(normalize(reference).split())))
