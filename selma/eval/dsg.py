"""DSG (Davidsonian Scene Graph, Cho et al. 2024): DSG-1K's questions, and DSG questions for new prompts.

DSG-1K ships as ``dsg-1k-anns.csv`` (github.com/j-min/DSG): one row per question with its
``proposition_id``, ``dependency`` (parent ids, ``0`` for none), categories and the prompt.

For prompts without questions, :func:`generate_dsg_questions` makes DSG's three LLM calls through
the same backends as the prompt stage: the prompt's atomic tuples first, then, from those, the
dependencies between them and one yes/no question per tuple.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import ray

from selma.eval.questions import YES_NO, question_table
from selma.llm import complete
from selma.prompts.stage import REQUEST_SCHEMA

# Few-shot examples written for selma in DSG's output format ("id | ...").
DSG_EXAMPLES = [
    {
        "prompt": "A rubix cube with ten squares of purple",
        "tuples": ["entity - whole (rubix cube)", "attribute - color (rubix cube, purple)",
                   "other - count (rubix cube squares, ==10)"],
        "dependencies": ["0", "1", "1"],
        "questions": ["Is there a rubix cube?", "Is the rubix cube purple?", "Does the rubix cube have ten squares?"],
    },
    {
        "prompt": "two brown dogs sleeping on a red sofa next to a window",
        "tuples": ["entity - whole (dogs)", "other - count (dogs, ==2)", "attribute - color (dogs, brown)",
                   "entity - whole (sofa)", "attribute - color (sofa, red)", "entity - whole (window)",
                   "entity - state (dogs, sleep)", "relation - spatial (dogs, sofa, on)",
                   "relation - spatial (sofa, window, next to)"],
        "dependencies": ["0", "1", "1", "0", "4", "0", "1", "1,4", "4,6"],
        "questions": ["Are there dogs?", "Are there two dogs?", "Are the dogs brown?", "Is there a sofa?",
                      "Is the sofa red?", "Is there a window?", "Are the dogs sleeping?", "Are the dogs on the sofa?",
                      "Is the sofa next to the window?"],
    },
]
TUPLE_TASK = ("Task: break an image description into atomic propositions, one per line as "
              "\"id | category - subcategory (arguments)\". Categories: entity (whole, part, state), attribute "
              "(color, type, material, shape, texture, size, style, text), relation (spatial, action, "
              "part-whole), global (style, view) and other (count, text).")
DEPENDENCY_TASK = ("Task: for each proposition, list the ids of the propositions it presupposes, one per line as "
                   "\"id | parent ids\" (comma-separated; 0 when it presupposes none).")
QUESTION_TASK = ("Task: turn each proposition into one yes/no question about the image, one per line as "
                 "\"id | question\".")
LIST_LINE = re.compile(r"^\s*(\d+)\s*\|\s*(.*?)\s*$")
CALLS = ("tuples", "dependencies", "questions")


class DSGParseError(ValueError):
    """An LLM completion that is not the numbered list a DSG call asks for."""


def load_dsg1k(path: str | Path) -> pa.Table:
    """DSG-1K's annotations as a question table (1,060 prompts, 8,182 questions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DSG-1K annotations not found at {path} (dsg-1k-anns.csv from github.com/j-min/DSG)")
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"dependency": pa.string()}))
    rows = []
    for row in table.to_pylist():
        rows.append({
            "item_id": row["item_id"], "prompt": row["text"], "source": row["item_id"].rsplit("_", 1)[0],
            "question_id": int(row["proposition_id"]), "question": row["question_natural_language"],
            "choices": YES_NO, "answer": "yes", "parents": parse_parent_ids(row["dependency"], strict=False),
            "category_broad": row["category_broad"], "category_detailed": row["category_detailed"],
        })
    return question_table(rows)


def parse_parent_ids(text: str | None, *, strict: bool = True) -> list[int]:
    """``"1,2"`` → [1, 2]; ``"0"`` (no parent) → []. Not strict: skip parts that are not ids (ten
    DSG-1K rows name an argument among their parents, e.g. ``"5, right"``)."""
    parts = [p.strip() for p in str(text or "0").split(",") if p.strip()]
    if not strict:
        parts = [p for p in parts if p.isdigit()]
    return [int(p) for p in parts if int(p) != 0]


def _numbered(lines: list[str]) -> str:
    return "\n".join(f"{i} | {line}" for i, line in enumerate(lines, start=1))


def dsg_request(call: str, prompt: str, tuples: list[str] | None = None) -> str:
    """The text an LLM continues for one of DSG's calls: a task line, examples, then the prompt."""
    task = {"tuples": TUPLE_TASK, "dependencies": DEPENDENCY_TASK, "questions": QUESTION_TASK}[call]
    blocks = [task]
    for example in DSG_EXAMPLES:
        block = f"Description: {example['prompt']}\n"
        if call != "tuples":
            block += f"Propositions:\n{_numbered(example['tuples'])}\n"
        heading = {"tuples": "Propositions", "dependencies": "Dependencies", "questions": "Questions"}[call]
        block += f"{heading}:\n{_numbered(example[call])}"
        blocks.append(block)
    last = f"Description: {prompt}\n"
    if call != "tuples":
        last += f"Propositions:\n{_numbered(tuples or [])}\n"
    last += {"tuples": "Propositions:", "dependencies": "Dependencies:", "questions": "Questions:"}[call]
    blocks.append(last)
    return "\n\n".join(blocks) + "\n"


def parse_numbered(completion: str) -> list[str]:
    """The ``id | text`` lines the completion starts with, numbered 1..n; stops at the first other line."""
    items: list[str] = []
    for line in completion.strip().splitlines():
        match = LIST_LINE.match(line)
        if not match:
            if items:
                break
            continue
        number, text = int(match.group(1)), match.group(2)
        if number != len(items) + 1:
            if items:
                break
            raise DSGParseError(f"the list starts at {number}, not 1")
        items.append(text)
    if not items:
        raise DSGParseError("no 'id | text' lines")
    return items


def assemble_questions(item_id: str, prompt: str, source: str, tuples: list[str], dependencies: str,
                       questions: str) -> list[dict]:
    """Question rows from the three completions; raises DSGParseError when they disagree."""
    question_texts = parse_numbered(questions)[: len(tuples)]
    dependency_texts = parse_numbered(dependencies)[: len(tuples)]
    if len(question_texts) != len(tuples) or len(dependency_texts) != len(tuples):
        raise DSGParseError(f"{len(tuples)} propositions but {len(question_texts)} questions and "
                            f"{len(dependency_texts)} dependency lines")
    rows = []
    for number, (proposition, question, dependency) in enumerate(zip(tuples, question_texts, dependency_texts), 1):
        try:
            parents = parse_parent_ids(dependency)
        except ValueError:
            raise DSGParseError(f"dependency line {number} is not a list of ids: {dependency!r}") from None
        # Parents may come later in the list (92 of DSG-1K's questions have one), never itself or past the end.
        if number in parents or any(p > len(tuples) for p in parents):
            raise DSGParseError(f"proposition {number} depends on itself or an unknown one: {parents}")
        category = proposition.split("(", 1)[0]
        broad, _, detailed = (part.strip() for part in category.partition("-"))
        rows.append({"item_id": item_id, "prompt": prompt, "source": source, "question_id": number,
                     "question": question, "choices": YES_NO, "answer": "yes", "parents": parents,
                     "category_broad": broad or "other", "category_detailed": detailed or broad or "other"})
    return rows


def generate_dsg_questions(prompts: list[dict], llm_config, *, progress=print) -> tuple[pa.Table, list[dict]]:
    """DSG questions for ``prompts`` (dicts with item_id, prompt, source) through an LLM backend on
    Ray Data: tuples first, then dependencies and questions from them. Returns (question table,
    failures) where each failure names its item and why."""
    completions = _complete(llm_config, [("tuples", i, dsg_request("tuples", p["prompt"])) for i, p in enumerate(prompts)])
    tuples, failures = {}, []
    for index, prompt in enumerate(prompts):
        try:
            tuples[index] = parse_numbered(completions[("tuples", index)])
        except DSGParseError as err:
            failures.append({"item_id": prompt["item_id"], "call": "tuples", "error": str(err)})
    requests = [(call, i, dsg_request(call, prompts[i]["prompt"], tuples[i]))
                for i in tuples for call in ("dependencies", "questions")]
    completions.update(_complete(llm_config, requests))
    rows = []
    for index, found in tuples.items():
        prompt = prompts[index]
        try:
            rows += assemble_questions(prompt["item_id"], prompt["prompt"], prompt["source"], found,
                                       completions[("dependencies", index)], completions[("questions", index)])
        except DSGParseError as err:
            failures.append({"item_id": prompt["item_id"], "call": "dependencies/questions", "error": str(err)})
    progress(f"[eval] wrote DSG questions for {len(prompts) - len(failures)} of {len(prompts)} prompts "
             f"({len(rows)} questions){'; failures: ' + str(len(failures)) if failures else ''}")
    return question_table(rows), failures


def _complete(llm_config, requests: list[tuple[str, int, str]]) -> dict[tuple[str, int], str]:
    """Completions of (call, index, text) requests on the configured LLM backend, keyed by (call, index)."""
    if not requests:
        return {}
    rows = [{"skill": call, "prompt": text, "seed": llm_config.seed, "num_candidates": 0, "first_index": 1,
             "round": 0, "index": index} for call, index, text in requests]
    dataset = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA))
    answered = complete(dataset, llm_config, skills={}).take_all()
    out = {}
    for row in answered:
        out[(row["skill"], int(row["index"]))] = "" if row.get("llm_error") else (row.get("completion") or "")
    return out
