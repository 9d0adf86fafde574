"""DSG questions for new prompts: DSG's three LLM calls through the prompt stage's LLM backends.

The LLM is a local server speaking the OpenAI protocol that answers each call with DSG-1K's own
annotation of the prompt, so the questions written must be exactly DSG-1K's."""

import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from selma.config import load_config
from selma.core.rundir import RunDir
from selma.eval.dsg import load_dsg1k

sys.path.insert(0, str(Path(__file__).parents[1] / "prompts"))
from openai_server import FakeOpenAI  # noqa: E402
from shared_data import BENCHMARKS, needs_benchmarks  # noqa: E402

pytestmark = [pytest.mark.slow, needs_benchmarks]  # runs on a local Ray

DSG_CSV = BENCHMARKS / "dsg-1k-anns.csv"
ITEMS = ["whoops_5", "countbench_10", "tifa160_7", "localized_narratives_72", "vrd_3", "midjourney_20"]


def dsg_annotations() -> dict[str, list[dict]]:
    table = pacsv.read_csv(DSG_CSV, convert_options=pacsv.ConvertOptions(column_types={"dependency": pa.string()}))
    by_prompt: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_prompt.setdefault(row["text"], []).append(row)
    return by_prompt


def dsg_writer(annotations):
    """Answers a DSG call with the annotation of the last described prompt, as a chatty LLM might."""
    def respond(prompt: str) -> str:
        described = re.findall(r"Description: (.*)\n", prompt)[-1]
        call = prompt.rstrip().rsplit("\n", 1)[-1]
        rows = annotations.get(described)
        if rows is None:
            return "I am not able to help with that."
        column = {"Propositions:": "tuple", "Dependencies:": "dependency", "Questions:": "question_natural_language"}[call]
        lines = [f"{r['proposition_id']} | {r[column]}" for r in rows]
        return "\n".join(lines) + "\n\nDescription: another prompt the model goes on to invent"
    return respond


def test_dsg_questions_for_new_prompts_match_dsg1k_and_are_kept_in_the_run(ray_local, tmp_path):
    from selma.eval.run import written_questions

    annotations = dsg_annotations()
    expected = [r for r in load_dsg1k(DSG_CSV).to_pylist() if r["item_id"] in ITEMS]
    prompt_of = {r["item_id"]: r["prompt"] for r in expected}
    prompts = [{"item_id": i, "prompt": prompt_of[i], "source": "mine"} for i in ITEMS]
    prompts.append({"item_id": "odd", "prompt": "a prompt the LLM refuses", "source": "mine"})
    with FakeOpenAI(respond=dsg_writer(annotations)) as server:
        config = load_config("tiny", ["eval.questions.backend=openai", "eval.questions.model=dsg-writer",
                                      f"eval.questions.openai.base_url={server.base_url}", "eval.questions.batch_size=4"])
        run = RunDir(str(tmp_path / "run"))
        table = written_questions("prompts", prompts, config, run, progress=lambda _: None)
        calls = len(server.requests)
        again = written_questions("prompts", prompts, config, run, progress=lambda _: None)
        assert len(server.requests) - calls == 1  # only the refused prompt is asked again (its tuples)

    rows = table.to_pylist()
    assert calls == 3 * len(ITEMS) + 1
    key = ("item_id", "question_id", "question", "parents", "category_broad", "category_detailed", "choices", "answer")
    assert sorted(tuple(str(r[k]) for k in key) for r in rows) == sorted(tuple(str(r[k]) for k in key) for r in expected)
    assert again.num_rows == table.num_rows
    failures = run.read_table("errors", "eval", "questions", "prompts").to_pylist()
    assert [(f["item_id"], f["call"]) for f in failures][:1] == [("odd", "tuples")]
