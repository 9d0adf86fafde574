"""TIFA v1.0 (Hu et al. 2023): its prompts, its question files, and free-form answers mapped to choices.

``tifa_v1.0_text_inputs.json`` holds 4,081 prompts; ``tifa_v1.0_question_answers.json`` (the TIFA
release format: ``id, caption, question, choices, answer, answer_type, element``) their
multiple-choice questions. TIFA maps a VQA model's free-form answer to the choice whose
sentence embedding is closest (SBERT cosine similarity) unless it names one exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from selma.core.models import resolve_model
from selma.eval.questions import is_yes_no, match_choice, normalize_answer, question_table


def _read_json_list(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path} (github.com/Yushi-Hu/tifa, tifa_v1.0/)")
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what}")
    return data


def tifa_source(item_id: str) -> str:
    return item_id.rsplit("_", 1)[0]


def load_tifa_prompts(path: str | Path) -> list[dict]:
    """``{item_id, prompt, source}`` for every TIFA v1.0 text input."""
    return [{"item_id": row["id"], "prompt": row["caption"], "source": tifa_source(row["id"])}
            for row in _read_json_list(path, "TIFA text inputs")]


def load_tifa_questions(path: str | Path) -> pa.Table:
    """A question file in TIFA's release format as a question table (numbered per prompt)."""
    rows, counts = [], {}
    for number, row in enumerate(_read_json_list(path, "TIFA question-answers")):
        missing = [k for k in ("id", "caption", "question", "choices", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}: entry {number} lacks {missing}")
        if row["answer"] not in row["choices"]:
            raise ValueError(f"{path}: entry {number}: answer {row['answer']!r} is not one of its choices")
        counts[row["id"]] = counts.get(row["id"], 0) + 1
        kind = row.get("answer_type") or "other"
        rows.append({"item_id": row["id"], "prompt": row["caption"], "source": tifa_source(row["id"]),
                     "question_id": counts[row["id"]], "question": row["question"], "choices": list(row["choices"]),
                     "answer": row["answer"], "parents": [], "category_broad": kind, "category_detailed": kind})
    return question_table(rows)


class AnswerMapper:
    """Maps free-form answers to one of their choices: exact or yes/no matches first, then the
    choice with the nearest sentence embedding (a local sentence-transformers folder). A yes/no
    question's answer that is not "yes" counts as "no", as DSG scores it."""

    def __init__(self, encoder: str | None = None, *, device: str | None = None):
        self.encoder_path = encoder
        self.device = device
        self._encoder = None

    def _encode(self, texts: list[str]):
        if self._encoder is None:
            if not self.encoder_path:
                raise ValueError("a free-form answer names no choice and no eval.answer_encoder is set to map it "
                                 "(a sentence-transformers folder, e.g. all-mpnet-base-v2 as TIFA uses)")
            from sentence_transformers import SentenceTransformer  # optional: the [eval] extra

            path = resolve_model(self.encoder_path)
            if not Path(path).is_dir():
                raise FileNotFoundError(f"eval.answer_encoder: no sentence-embedding model at {path} (local weights only)")
            self._encoder = SentenceTransformer(path, device=self.device or "cpu", local_files_only=True)
        return self._encoder.encode(texts, convert_to_tensor=True, normalize_embeddings=True)

    def map(self, answers: list[str], choices: list[list[str]]) -> list[str]:
        mapped: list[str | None] = [match_choice(a, c) for a, c in zip(answers, choices)]
        for i, (found, options) in enumerate(zip(mapped, choices)):
            if found is None and is_yes_no(options):
                mapped[i] = next(c for c in options if normalize_answer(c) == "no")
        pending = [i for i, m in enumerate(mapped) if m is None]
        if pending:
            answer_vectors = self._encode([answers[i] or "" for i in pending])
            for vector, i in zip(answer_vectors, pending):
                choice_vectors = self._encode(list(choices[i]))
                mapped[i] = choices[i][int((choice_vectors @ vector).argmax())]
        return mapped
