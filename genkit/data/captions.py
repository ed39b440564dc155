"""Captions for text-conditioned models: items gain a `caption` string (collated into a list).

* digits: templated captions of each label, chosen by the item's index (no random draws), in
  numerals and words: "a handwritten digit 7", "a handwritten digit seven", "the number 7", ...
* a folder with `metadata.jsonl` (the Hugging Face image-folder convention): one JSON object per
  line with `file_name` (relative to the folder) and `text`, and optionally an integer `label`
  (class conditioning). The metadata lists the dataset: exactly its files, in its order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from genkit.data.folder import FolderDataset, decode
from genkit.data.base import unlabelled
from genkit.errors import DataError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a handwritten digit {}", "the number {}", "a picture of a {}")
METADATA = "metadata.jsonl"


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


def read_metadata(root: Path) -> tuple[list[Path], list[str], list[int] | None]:
    """(files, captions, labels or None) from root/metadata.jsonl; DataError names the line."""
    path = root / METADATA
    files, texts, labels = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{n}: needs string keys 'file_name' and 'text'")
        file = root / row["file_name"]
        if not file.is_file():
            raise DataError(f"{path}:{n}: image '{file}' not found")
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            raise DataError(f"{path}:{n}: 'label' must be an integer >= 0, got {label!r}")
        files.append(file)
        texts.append(row["text"])
        labels.append(label)
    if not files:
        raise DataError(f"{path}: no entries")
    given = [lab is not None for lab in labels]
    if any(given) and not all(given):
        raise DataError(f"{path}:{given.index(False) + 1}: 'label' missing (give it on every line or none)")
    return files, texts, labels if all(given) else None


class CaptionedFolderDataset(FolderDataset):
    """The images and captions (and labels) listed in a folder's metadata.jsonl, decoded per item."""

    def __init__(self, root: Path, *, channels: int, image_size: int) -> None:
        files, self.captions, labels = read_metadata(root)
        super().__init__(root, files, channels=channels, image_size=image_size)
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        self.num_classes = 0 if labels is None else max(labels) + 1

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        label = unlabelled() if self.labels is None else self.labels[index].clone()
        return decode(self.files[index], self.channels, self.image_size), label

    def __getitem__(self, index: int) -> dict:
        return dict(super().__getitem__(index), caption=self.captions[index])
