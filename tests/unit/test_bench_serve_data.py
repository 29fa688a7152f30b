"""Datasets of `cachegen bench serve`, built offline with the whitespace token estimate (no tokenizer, no network)."""

from __future__ import annotations

import json

import pytest

from bench.serve_data import (
    QA_HEAD,
    DatasetConfig,
    TokenCounter,
    build_dataset,
)
from bench.serve_squad import load_squad, parse_squad

COUNTER = TokenCounter(None)


def test_random_dataset_is_seeded_and_sized():
    config = DatasetConfig(name="random", num_prompts=5, seed=3, random_input_len=100, random_output_len=7)
    first, again = build_dataset(config, COUNTER), build_dataset(config, COUNTER)
    assert first == again
    assert len(first) == 5 and all(r.output_len == 7 for r in first)
    assert all(abs(r.prompt_len - 100) <= 2 for r in first)
    other = build_dataset(DatasetConfig(name="random", num_prompts=5, seed=4), COUNTER)
    assert other[0].prompt != first[0].prompt


def test_random_range_ratio_spreads_lengths():
    config = DatasetConfig(name="random", num_prompts=40, random_input_len=100, random_range_ratio=0.5)
    lengths = [r.prompt_len for r in build_dataset(config, COUNTER)]
    assert min(lengths) >= 48 and max(lengths) <= 152 and len(set(lengths)) > 10


def test_squad_keeps_only_answerable_questions():
    data = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "B text",
                        "qas": [{"question": "q1", "is_impossible": False}, {"question": "q2", "is_impossible": True}],
                    },
                    {"context": "A text", "qas": [{"question": "q3", "is_impossible": True}]},
                ]
            }
        ]
    }
    paragraphs = parse_squad(data)
    assert [(p.context, p.questions) for p in paragraphs] == [("B text", ("q1",))]


def test_installed_squad_is_real():
    paragraphs = load_squad()
    assert len(paragraphs) > 1000
    assert any("Normans" in p.context for p in paragraphs)


def test_long_doc_qa_asks_each_document_in_rounds_within_budget():
    config = DatasetConfig(name="long-doc-qa", num_prompts=12, questions_per_doc=4, context_tokens=1500, output_len=9)
    requests = build_dataset(config, COUNTER)
    assert [r.doc_id for r in requests] == [0, 1, 2] * 4  # rounds: a context repeats after its first prefill
    for doc_id in range(3):
        prompts = [r.prompt for r in requests if r.doc_id == doc_id]
        contexts = {p[: p.rindex("Question:")] for p in prompts}
        assert len(contexts) == 1, "every question of a document shares its whole context (the reusable prefix)"
        assert len(set(prompts)) == 4, "four different questions"
        assert prompts[0].startswith(QA_HEAD) and "Document 2:" in prompts[0]
    assert all(1000 < r.prompt_len <= 1500 for r in requests)
    assert all(r.output_len == 9 for r in requests)


def test_long_doc_qa_documents_differ_and_are_seeded():
    config = DatasetConfig(name="long-doc-qa", num_prompts=4, questions_per_doc=2, context_tokens=800)
    requests = build_dataset(config, COUNTER)
    assert requests[0].prompt != requests[1].prompt
    assert requests == build_dataset(config, COUNTER)


def test_multi_round_turns_are_new_messages_of_sessions():
    config = DatasetConfig(name="multi-round", num_prompts=6, num_turns=3, context_tokens=600)
    requests = build_dataset(config, COUNTER)
    assert [r.session_id for r in requests] == [0, 1] * 3
    assert requests[0].prompt.startswith(QA_HEAD)
    assert requests[2].prompt.startswith("Question:") and requests[2].prompt_len < 60


def test_custom_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello world", "output_tokens": 5}, {"prompt": "second one"}, {"prompt": "third"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    requests = build_dataset(DatasetConfig(name="custom", num_prompts=2, path=str(path)), COUNTER)
    assert [(r.prompt, r.output_len) for r in requests] == [("hello world", 5), ("second one", 128)]


def test_custom_jsonl_rejects_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(TypeError, match="bad.jsonl:1"):
        build_dataset(DatasetConfig(name="custom", path=str(path)), COUNTER)
    with pytest.raises(ValueError, match="dataset-path"):
        build_dataset(DatasetConfig(name="custom"), COUNTER)


def test_whitespace_estimate():
    assert COUNTER.count("one two three four five six seven eight nine ten") == 13
