from selma.prompts.parse import parse_completion


def test_plain_continuation_of_a_numbered_list():
    completion = " A red kite over a beach.\n5. Two dogs chase a ball in the park.\n6. A lamp beside a bed."
    candidates, unparseable = parse_completion(completion)
    assert candidates == ["A red kite over a beach.", "Two dogs chase a ball in the park.", "A lamp beside a bed."]
    assert unparseable == 0


def test_numbering_variants_bullets_quotes_and_blank_lines():
    completion = (
        "\n\n"
        "5) A blue car parked under a tree.\n"
        "(6) A cat sleeping on a warm laptop.\n"
        "- A bowl of soup next to bread.\n"
        "* \"A child flying a yellow kite.\"\n"
        "8: A chef slicing three tomatoes.\n"
        "\n"
        "9.   A   horse   in   the   snow.  \n"
    )
    candidates, _ = parse_completion(completion)
    assert candidates == [
        "A blue car parked under a tree.",
        "A cat sleeping on a warm laptop.",
        "A bowl of soup next to bread.",
        "A child flying a yellow kite.",
        "A chef slicing three tomatoes.",
        "A horse in the snow.",
    ]


def test_preamble_repeats_and_fragments_are_dropped():
    completion = (
        "Here are 20 more diverse image descriptions:\n"
        "1. A boat on a calm lake.\n"
        "2. a boat on a calm lake.\n"
        "3. Ok\n"
        "Note that these are varied.\n"
        "4. A squirrel eating a nut on a bench."
    )
    candidates, unparseable = parse_completion(completion)
    assert candidates == ["A boat on a calm lake.", "A squirrel eating a nut on a bench."]
    assert unparseable == 3  # the preamble, the fragment, the note


def test_truncated_last_line_is_dropped():
    candidates, unparseable = parse_completion("A kite.\n5. A red barn in a field.\n6. Two owls sitting on", truncated=True)
    assert candidates == ["A red barn in a field."]
    assert unparseable == 2


def test_garbage_gives_nothing():
    assert parse_completion("")[0] == []
    assert parse_completion("\x00\x01 ### ---")[0] == []


def test_undecodable_and_control_characters_are_cleaned_or_dropped():
    text = " A red kite \ufffd\ufffd over a beach\n5. \udcff\udcfe\x07\n6. Two dogs\x1b[0m chasing a ball"
    candidates, unparseable = parse_completion(text)
    assert candidates == ["A red kite \ufffd\ufffd over a beach", "Two dogs[0m chasing a ball"]
    assert unparseable == 1


def test_a_chat_models_answer_keeps_only_its_list_items():
    answer = (
        "Of course! I would be glad to write some for you\n"
        "\n"
        "4. A red bus parked next to a bakery.\n"
        "**5.** Two **cats** asleep on a sunny windowsill.\n"
        "6) A chef slicing bread in a small kitchen.\n"
        "\n"
        "Let me know if you want more descriptions like these!"
    )
    candidates, unparseable = parse_completion(answer, answer=True)
    assert candidates == ["A red bus parked next to a bakery.", "Two cats asleep on a sunny windowsill.",
                          "A chef slicing bread in a small kitchen."]
    assert unparseable == 2
    # As a continuation the unnumbered first line would have been taken for item 4.
    assert parse_completion(answer)[0][0] == "Of course! I would be glad to write some for you"


def test_a_chat_answer_cut_off_by_the_token_limit_loses_its_last_item():
    answer = "Here you go:\n4. A kite above a beach at noon.\n5. Three dogs running across a"
    assert parse_completion(answer, answer=True, truncated=True) == (["A kite above a beach at noon."], 2)
