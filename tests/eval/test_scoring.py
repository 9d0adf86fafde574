"""DSG and TIFA: loading, DSG's dependency rule and the aggregators, against hand-computed cases."""

import pytest
from shared_data import BENCHMARKS, needs_benchmarks

from selma.eval.dsg import DSGParseError, assemble_questions, dsg_request, load_dsg1k, parse_numbered, parse_parent_ids
from selma.eval.questions import match_choice, sample_items, score_answers, summarize
from selma.eval.tifa import AnswerMapper, load_tifa_prompts, load_tifa_questions

DSG_CSV = BENCHMARKS / "dsg-1k-anns.csv"
TIFA_PROMPTS = BENCHMARKS / "tifa_v1.0_text_inputs.json"


def row(item, image, qid, correct, parents=(), broad="entity", detailed="whole", source="src"):
    return {"item_id": item, "image_id": image, "question_id": qid, "correct": float(correct), "parents": list(parents),
            "category_broad": broad, "category_detailed": detailed, "source": source}


def chain_item():
    """q1 answered "no"; q2 depends on q1; q3 on q2; q4 on nothing."""
    return [row("a", "a0", 1, 0), row("a", "a0", 2, 1, [1]), row("a", "a0", 3, 1, [2]), row("a", "a0", 4, 1)]


def test_a_question_whose_parent_was_answered_no_scores_zero_but_its_own_children_keep_theirs():
    scores = {r["question_id"]: r["score"] for r in score_answers(chain_item())}
    # As DSG's reference code: parents are judged by their own answers, not their zeroed scores.
    assert scores == {1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0}


def test_any_failed_parent_among_several_zeroes_the_question():
    rows = [row("a", "a0", 1, 1), row("a", "a0", 2, 0), row("a", "a0", 3, 1, [1, 2])]
    assert [r["score"] for r in score_answers(rows)] == [1.0, 0.0, 0.0]


def test_dependencies_are_per_image():
    rows = [row("a", "x", 1, 0), row("a", "x", 2, 1, [1]), row("a", "y", 1, 1), row("a", "y", 2, 1, [1])]
    assert [r["score"] for r in score_answers(rows)] == [0.0, 0.0, 1.0, 1.0]


def test_item_mean_and_question_micro_average_with_and_without_dependencies():
    rows = score_answers(chain_item() + [row("b", "b0", 1, 1)])
    overall = summarize(rows)["overall"]
    # item a: 2/4 with dependencies, 3/4 without; item b: 1/1.
    assert overall["item_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert overall["question_mean"] == pytest.approx(3 / 5)
    assert overall["item_mean_no_dependencies"] == pytest.approx((0.75 + 1.0) / 2)
    assert overall["question_mean_no_dependencies"] == pytest.approx(4 / 5)
    assert (overall["items"], overall["questions"]) == (2, 5)


def test_an_items_images_are_averaged_before_the_items_are():
    rows = score_answers([row("c", "c0", 1, 1), row("c", "c0", 2, 1), row("c", "c1", 1, 1), row("c", "c1", 2, 0),
                          row("d", "d0", 1, 0), row("d", "d0", 2, 0), row("d", "d0", 3, 0)])
    overall = summarize(rows)["overall"]
    assert overall["item_mean"] == pytest.approx((0.75 + 0.0) / 2)
    assert overall["question_mean"] == pytest.approx(3 / 7)
    assert "item_mean_no_dependencies" not in overall  # no question has a parent


def test_per_category_and_per_source_groups():
    rows = score_answers([
        row("a", "a0", 1, 1, broad="entity", detailed="whole", source="coco"),
        row("a", "a0", 2, 0, [1], broad="attribute", detailed="color", source="coco"),
        row("b", "b0", 1, 0, broad="entity", detailed="whole", source="whoops"),
        row("b", "b0", 2, 1, [1], broad="attribute", detailed="color", source="whoops"),
    ])
    summary = summarize(rows)
    assert summary["per_category_broad"]["entity"]["question_mean"] == pytest.approx(0.5)
    assert summary["per_category_broad"]["attribute"]["question_mean"] == 0.0  # b's color: its parent failed
    assert summary["per_category_broad"]["attribute"]["question_mean_no_dependencies"] == pytest.approx(0.5)
    assert summary["per_category_detailed"]["color"]["questions"] == 2
    assert summary["per_source"]["coco"]["item_mean"] == pytest.approx(0.5)
    assert summary["per_source"]["whoops"]["item_mean"] == 0.0
    assert summary["per_source"]["whoops"]["item_mean_no_dependencies"] == pytest.approx(0.5)


@needs_benchmarks
def test_dsg1k_loads_with_its_dependency_graph():
    table = load_dsg1k(DSG_CSV)
    rows = table.to_pylist()
    assert table.num_rows == 8182 and len({r["item_id"] for r in rows}) == 1060
    whoops = [r for r in rows if r["item_id"] == "whoops_5"]
    assert [(r["question_id"], r["parents"]) for r in whoops] == [(1, []), (2, [1]), (3, [1])]
    assert whoops[1]["question"] == "Is the rubix cube purple?" and whoops[1]["category_detailed"] == "color"
    assert {r["source"] for r in rows} >= {"whoops", "countbench", "localized_narratives", "diffusiondb", "tifa160"}
    assert any(len(r["parents"]) == 2 for r in rows)
    assert all(r["choices"] == ["yes", "no"] and r["answer"] == "yes" for r in rows)


@needs_benchmarks
def test_limit_samples_whole_items_reproducibly():
    table = load_dsg1k(DSG_CSV)
    first, again, other = (sample_items(table, 20, seed) for seed in (0, 0, 1))
    items = set(first.column("item_id").to_pylist())
    assert len(items) == 20 and items == set(again.column("item_id").to_pylist())
    assert items != set(other.column("item_id").to_pylist())
    full = table.filter(__import__("pyarrow.compute", fromlist=["x"]).is_in(table.column("item_id"), first.column("item_id").unique()))
    assert full.num_rows == first.num_rows  # every question of a sampled item is kept


def test_parent_ids():
    assert parse_parent_ids("0") == [] and parse_parent_ids("1,2") == [1, 2] and parse_parent_ids(" 3 , 4") == [3, 4]
    assert parse_parent_ids("5, right", strict=False) == [5]
    with pytest.raises(ValueError):
        parse_parent_ids("5, right")


@needs_benchmarks
def test_tifa_prompts_and_a_question_file_in_the_release_format(tmp_path):
    prompts = load_tifa_prompts(TIFA_PROMPTS)
    assert len(prompts) == 4081 and prompts[0] == {"item_id": "coco_301091", "source": "coco",
                                                   "prompt": "On a gray day a surfer carrying a white board walks on a beach."}
    qa = tmp_path / "qa.json"
    qa.write_text(__import__("json").dumps([
        {"id": "coco_301091", "caption": prompts[0]["prompt"], "question": "is this a surfer?", "choices": ["yes", "no"],
         "answer": "yes", "answer_type": "animal/human", "element": "surfer", "coco_val_id": "380711"},
        {"id": "coco_301091", "caption": prompts[0]["prompt"], "question": "what color is the board?",
         "choices": ["white", "red", "blue", "black"], "answer": "white", "answer_type": "color", "element": "white"},
    ]))
    rows = load_tifa_questions(qa).to_pylist()
    assert [(r["question_id"], r["category_broad"], r["parents"]) for r in rows] == [(1, "animal/human", []), (2, "color", [])]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "x", "caption": "c", "question": "q?", "choices": ["a", "b"], "answer": "z"}]')
    with pytest.raises(ValueError, match="not one of its choices"):
        load_tifa_questions(bad)


def test_answers_naming_a_choice_map_without_an_encoder():
    assert match_choice("Yes, there is.", ["yes", "no"]) == "yes"
    assert match_choice(" White ", ["white", "red"]) == "white"
    assert match_choice("a white one", ["white", "red"]) is None
    mapper = AnswerMapper(None)
    assert mapper.map(["no way", "purple cat", "yes"], [["yes", "no"]] * 3) == ["no", "no", "yes"]
    with pytest.raises(ValueError, match="answer_encoder"):
        mapper.map(["a white one"], [["white", "red"]])


def test_dsg_requests_and_their_parsing():
    request = dsg_request("questions", "a cat on a mat", ["entity - whole (cat)", "entity - whole (mat)"])
    assert request.endswith("Description: a cat on a mat\nPropositions:\n1 | entity - whole (cat)\n"
                            "2 | entity - whole (mat)\nQuestions:\n")
    assert "Is the rubix cube purple?" in request
    assert parse_numbered("Sure:\n1 | Is there a cat?\n2 | Is there a mat?\n\nDescription: next") == [
        "Is there a cat?", "Is there a mat?"]
    with pytest.raises(DSGParseError):
        parse_numbered("no list here")
    rows = assemble_questions("i", "a cat on a mat", "mine", ["entity - whole (cat)", "relation - spatial (cat, mat, on)"],
                              "1 | 0\n2 | 1", "1 | Is there a cat?\n2 | Is the cat on the mat?")
    assert [(r["question_id"], r["parents"], r["category_broad"], r["category_detailed"]) for r in rows] == [
        (1, [], "entity", "whole"), (2, [1], "relation", "spatial")]
    assert [r["parents"] for r in assemble_questions("i", "p", "s", ["entity - whole (cat)", "entity - whole (mat)"],
                                                     "1 | 2\n2 | 0", "1 | a?\n2 | b?")] == [[2], []]
    with pytest.raises(DSGParseError, match="itself or an unknown"):
        assemble_questions("i", "p", "s", ["entity - whole (cat)", "entity - whole (mat)"], "1 | 3\n2 | 0", "1 | a?\n2 | b?")
    with pytest.raises(DSGParseError, match="2 propositions but 1 questions"):
        assemble_questions("i", "p", "s", ["entity - whole (cat)", "entity - whole (mat)"], "1 | 0\n2 | 0", "1 | a?")
