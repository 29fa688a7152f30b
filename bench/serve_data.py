"""Workloads of `cachegen bench serve`: random, long-doc-qa (SQuAD v2, RULER-style), multi-round chat, JSONL.

Every dataset is built offline and deterministically from `--seed`. Token counts come from the model's
tokenizer when `--tokenizer DIR` is given (local files only), else from a whitespace estimate; they are only
estimates of what the server will see; the server's own `usage.prompt_tokens` wins when it reports one.
"""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.serve_squad import Paragraph, load_squad

# RULER's QA template (long_context_eval/data/synthetic/constants.py), kept verbatim so scores compare.
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_HEAD = f"{QA_INSTRUCTION}\n\nThe following are given documents.\n\n"
QA_TAIL = "\n\n" + QA_INSTRUCTION + "\n\nQuestion: {query} Answer:"
TOKENS_PER_WORD = 1.3  # English prose through a BPE tokenizer; only used without --tokenizer
QUESTION_RESERVE_TOKENS = 32  # room left in --context-tokens for the question itself


@dataclass(slots=True, frozen=True)
class SampleRequest:
    """One request to send. For multi-round sessions `prompt` is only this turn's new user message."""

    prompt: str
    prompt_len: int  # estimated tokens of `prompt`
    output_len: int  # max_tokens
    session_id: int | None = None  # turns of one session are sent in order, each with the history before it
    doc_id: int | None = None  # long-doc-qa: which document (requests of one document share its prefix)


@dataclass(slots=True, frozen=True)
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 100
    seed: int = 0
    path: str | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    context_tokens: int = 2048
    questions_per_doc: int = 4
    num_turns: int = 4
    output_len: int | None = None  # overrides every dataset's own output length


class TokenCounter:
    """Counts tokens with a local tokenizer, or estimates them from whitespace-separated words."""

    def __init__(self, tokenizer_dir: str | None = None) -> None:
        self.tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def build_dataset(config: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    builders: dict[str, Callable[[DatasetConfig, TokenCounter], list[SampleRequest]]] = {
        "random": random_requests,
        "long-doc-qa": long_doc_qa_requests,
        "multi-round": multi_round_requests,
        "custom": custom_requests,
    }
    if config.name not in builders:
        raise ValueError(f"unknown dataset {config.name!r}; choose from {sorted(builders)}")
    return builders[config.name](config, counter)


def _input_lens(config: DatasetConfig, rng: random.Random) -> list[int]:
    low = max(1, int(config.random_input_len * (1 - config.random_range_ratio)))
    high = max(low, int(config.random_input_len * (1 + config.random_range_ratio)))
    return [rng.randint(low, high) for _ in range(config.num_prompts)]


def random_requests(config: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    """Random token ids decoded by the tokenizer when there is one, else random lowercase words."""
    rng = random.Random(config.seed)
    output_len = config.output_len or config.random_output_len
    requests = []
    for length in _input_lens(config, rng):
        if counter.tokenizer is not None:
            text = _random_token_text(counter.tokenizer, length, rng)
        else:
            num_words = max(1, round(length / TOKENS_PER_WORD))
            text = " ".join(_random_word(rng) for _ in range(num_words))
        requests.append(SampleRequest(text, counter.count(text), output_len))
    return requests


def _random_token_text(tokenizer, length: int, rng: random.Random) -> str:
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    while len(ids) < length:
        token = rng.randrange(len(tokenizer))
        if token not in special:
            ids.append(token)
    return tokenizer.decode(ids)


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))


@dataclass(slots=True, frozen=True)
class Document:
    """A RULER-style context: one gold paragraph among distractors, with the questions to ask about it."""

    paragraphs: tuple[str, ...]
    questions: tuple[str, ...]

    def context(self) -> str:
        return "\n\n".join(f"Document {i + 1}:\n{text}" for i, text in enumerate(self.paragraphs))


def build_documents(paragraphs: list[Paragraph], config: DatasetConfig, num_docs: int, counter: TokenCounter):
    """`num_docs` contexts of about `context_tokens` tokens each; gold paragraphs are never reused."""
    rng = random.Random(config.seed)
    golds = rng.sample(range(len(paragraphs)), num_docs)
    budget = config.context_tokens - counter.count(QA_HEAD + QA_TAIL.format(query="")) - QUESTION_RESERVE_TOKENS
    documents = []
    for gold in golds:
        chosen, used = [gold], counter.count(paragraphs[gold].context)
        for index in rng.sample(range(len(paragraphs)), len(paragraphs)):
            if index == gold:
                continue
            cost = counter.count(paragraphs[index].context) + 4  # "Document N:" header
            if used + cost > budget:
                break
            chosen.append(index)
            used += cost
        rng.shuffle(chosen)
        # Gold questions first, then questions whose answers sit in the distractors (also in the context).
        questions = list(paragraphs[gold].questions) + [q for i in chosen if i != gold for q in paragraphs[i].questions]
        documents.append(Document(tuple(paragraphs[i].context for i in chosen), tuple(questions)))
    return documents


def long_doc_qa_requests(config: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    """Each document asked `questions_per_doc` times, in rounds (all documents' first questions, then the
    second ones, ...) so a repeated context arrives after its first prefill, as a reuse-aware workload needs."""
    per_doc = max(1, config.questions_per_doc)
    num_docs = math.ceil(config.num_prompts / per_doc)
    documents = build_documents(load_squad(), config, num_docs, counter)
    output_len = config.output_len or 32  # RULER's tokens_to_generate for QA
    requests = []
    for round_index in range(per_doc):
        for doc_id, document in enumerate(documents):
            question = document.questions[round_index % len(document.questions)]
            prompt = QA_HEAD + document.context() + QA_TAIL.format(query=question)
            requests.append(SampleRequest(prompt, counter.count(prompt), output_len, doc_id=doc_id))
    return requests[: config.num_prompts]


def multi_round_requests(config: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    """Chat sessions over a SQuAD context: turn 1 carries the documents and a question, later turns one more
    question each; the client sends every turn with the whole history (its real earlier answers) before it."""
    turns = max(1, config.num_turns)
    num_sessions = math.ceil(config.num_prompts / turns)
    documents = build_documents(load_squad(), config, num_sessions, counter)
    output_len = config.output_len or 64
    requests = []
    for turn in range(turns):
        for session_id, document in enumerate(documents):
            question = document.questions[turn % len(document.questions)]
            if turn == 0:
                text = QA_HEAD + document.context() + QA_TAIL.format(query=question)
            else:
                text = f"Question: {question} Answer:"
            requests.append(SampleRequest(text, counter.count(text), output_len, session_id=session_id))
    return requests[: config.num_prompts]


def custom_requests(config: DatasetConfig, counter: TokenCounter) -> list[SampleRequest]:
    """JSONL, one object a line: {"prompt": str, "output_tokens": int (optional)}; the first `num_prompts`."""
    if not config.path:
        raise ValueError("--dataset-name custom needs --dataset-path FILE.jsonl")
    requests = []
    for number, line in enumerate(Path(config.path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise TypeError(f"{config.path}:{number}: each line needs a string 'prompt'")
        output_len = config.output_len or int(record.get("output_tokens", 128))
        requests.append(SampleRequest(record["prompt"], counter.count(record["prompt"]), output_len))
        if len(requests) == config.num_prompts:
            break
    return requests
