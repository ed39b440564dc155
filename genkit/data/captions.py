"""Captions of the digits for text-conditioned models: items gain a `caption` string.

Templated captions of each label, chosen by the item's index (no random draws), in numerals and
words: "a handwritten digit 7", "a handwritten digit seven", "the number 7", ... (A folder's own
captions come from its `metadata.jsonl`: `genkit.data.folder`.)
"""

from __future__ import annotations

from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {}", "the number {}", "a picture of a {}")


def digit_prompt(digit: int) -> str:
    """The prompt that asks for one digit (the evaluation's and the issue's wording)."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def digit_captions(labels: Tensor) -> list[str]:
    """Item i of label d: template i mod 3, d in numerals for even i // 3, in words for odd."""
    out = []
    for i, d in enumerate(labels.tolist()):
        template = DIGIT_TEMPLATES[i % len(DIGIT_TEMPLATES)]
        out.append(template.format(DIGIT_WORDS[d] if (i // len(DIGIT_TEMPLATES)) % 2 else d))
    return out
