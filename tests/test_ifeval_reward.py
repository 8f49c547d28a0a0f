"""Tests for the IFEval verifiable reward (selfplay.rewards.ifeval)."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

from selfplay.rewards import ifeval

REPO_ROOT = Path(__file__).resolve().parents[1]

LOWER_NO_COMMA = (
    "my grey cat went missing on tuesday night. please call me if you see her "
    "near your garden or shed. thank you so much neighbour"
)
UPPER_WITH_COMMAS = (
    "MY GREY CAT WENT MISSING ON TUESDAY NIGHT, SO PLEASE CALL ME IF YOU SEE HER NEAR YOUR GARDEN OR SHED, THANK YOU."
)
LOWER_WITH_COMMAS = (
    "my grey cat went missing on tuesday night, so please call me if you see her near your garden or shed, thank you."
)

# A mix of plausible completions used to exercise every checker.
CANNED = [
    "",
    "ok",
    LOWER_NO_COMMA,
    UPPER_WITH_COMMAS,
    '"Dear neighbour, our cat Pepper is missing. Please call me. Any other questions?"',
    "<<Lost Cat>>\n* Grey fur\n* Blue collar\n\nFinally, call [phone] at [time].\nP.S. Thanks!",
    '{"note": "Please look out for our grey cat."}',
    "Section 1\nShe is grey.\nSection 2\nShe is shy.\n***\nThird part.\n******\nSecond answer.",
    "Hola vecino, mi gato gris se ha perdido. Por favor, llámame si lo ves en tu jardín.",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything (e.g. an NLTK download) tries to reach the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted during IFEval reward tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def row(*constraints: tuple[str, dict]) -> str:
    """Hand-built constraints JSON, as build_prompts stores it."""
    return json.dumps([{"id": i, "kwargs": kw} for i, kw in constraints])


def score(completions: list[str], constraints: str) -> list[float]:
    return ifeval.reward(["unused prompt"] * len(completions), completions, [constraints] * len(completions))


# ---------------------------------------------------------------- build_prompts


def test_build_prompts_deterministic_and_well_formed() -> None:
    a = ifeval.build_prompts(50, seed=3)
    assert a == ifeval.build_prompts(50, seed=3)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in ifeval.build_prompts(50, seed=4)]
    assert len({r["prompt_id"] for r in a}) == 50
    assert [r["prompt_id"] for r in a[:3]] == ["p00000", "p00001", "p00002"]
    for r in a:
        assert set(r) == {"prompt_id", "prompt", "constraints"}
        ids = [c["id"] for c in json.loads(r["constraints"])]
        assert 1 <= len(ids) <= 3
        assert len(ids) == len(set(ids))


def test_word_budget_adds_one_ungraded_last_line_unless_the_row_counts_words_itself() -> None:
    plain = ifeval.build_prompts(200, seed=5)
    budget = ifeval.build_prompts(200, seed=5, word_budget=60)
    line = ifeval.WORD_BUDGET_LINE.format(words=60)
    with_own_count = 0
    for a, b in zip(plain, budget, strict=True):
        assert a["constraints"] == b["constraints"] and a["prompt_id"] == b["prompt_id"]  # the judge is unchanged
        if any(c["id"] == "length_constraints:number_words" for c in json.loads(a["constraints"])):
            with_own_count += 1
            assert b["prompt"] == a["prompt"]
        else:
            assert b["prompt"] == a["prompt"] + "\n" + line
    assert 0 < with_own_count < 200


def test_constraint_counts_follow_bounds_and_all_counts_occur() -> None:
    counts = {len(json.loads(r["constraints"])) for r in ifeval.build_prompts(300, seed=0)}
    assert counts == {1, 2, 3}
    rows = ifeval.build_prompts(100, seed=0, min_constraints=2, max_constraints=2)
    assert {len(json.loads(r["constraints"])) for r in rows} == {2}
    with pytest.raises(ValueError):
        ifeval.build_prompts(5, seed=0, min_constraints=3, max_constraints=2)
    with pytest.raises(ValueError):
        ifeval.build_prompts(5, seed=0, min_constraints=0)


def test_constraints_never_conflict() -> None:
    # IFEval's conflict table, symmetrised independently of the module.
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    def conflict(a: str, b: str) -> bool:
        return b in INSTRUCTION_CONFLICTS.get(a, set()) or a in INSTRUCTION_CONFLICTS.get(b, set())

    for r in ifeval.build_prompts(1000, seed=11):
        ids = [c["id"] for c in json.loads(r["constraints"])]
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                assert not conflict(a, b), (a, b, r["prompt_id"])


def test_id_prefix_only_renames_rows_and_rows_do_not_depend_on_n() -> None:
    train = ifeval.build_prompts(20, seed=7, id_prefix="train")
    held = ifeval.build_prompts(20, seed=7, id_prefix="heldout")
    assert [r["prompt"] for r in train] == [r["prompt"] for r in held]
    assert held[4]["prompt_id"] == "heldout00004"
    assert ifeval.build_prompts(30, seed=7, id_prefix="train")[:20] == train


def test_build_prompts_restores_global_random_state() -> None:
    random.seed(1234)
    before = random.getstate()
    ifeval.build_prompts(30, seed=5)
    ifeval.reward(["p"], ["some text"], [row(("keywords:existence", {"keywords": ["x"]}))])
    assert random.getstate() == before


def test_build_prompts_ignores_global_random_state() -> None:
    random.seed(1)
    a = ifeval.build_prompts(30, seed=5)
    random.seed(2)
    assert ifeval.build_prompts(30, seed=5) == a


def test_same_output_across_processes() -> None:
    code = (
        "import json; from selfplay.rewards import ifeval as m;"
        "rows = m.build_prompts(40, seed=9);"
        "print(json.dumps([rows, m.reward([r['prompt'] for r in rows],"
        " [r['prompt'][::-1] for r in rows], [r['constraints'] for r in rows])]))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(proc.stdout))
    rows = ifeval.build_prompts(40, seed=9)
    here = [
        rows,
        ifeval.reward(
            [r["prompt"] for r in rows],
            [r["prompt"][::-1] for r in rows],
            [r["constraints"] for r in rows],
        ),
    ]
    assert outputs[0] == outputs[1] == here


def test_emitted_ids_are_exactly_the_used_ids() -> None:
    desc = ifeval.describe()
    emitted = {c["id"] for r in ifeval.build_prompts(3000, seed=2) for c in json.loads(r["constraints"])}
    assert emitted == set(desc["used"])
    assert not emitted & set(desc["excluded"])
    # The NLTK-dependent checkers must stay out.
    assert "length_constraints:number_sentences" in desc["excluded"]
    assert "change_case:capital_word_frequency" in desc["excluded"]
    assert set(desc["used"]) | set(desc["excluded"]) == set(INSTRUCTION_DICT)
    assert all(desc["excluded"].values())


def test_every_emitted_checker_runs_offline() -> None:
    # Rebuild straight from the library (no try/except): any raise fails the test.
    seen: dict[str, int] = {}
    for r in ifeval.build_prompts(3000, seed=4):
        for c in json.loads(r["constraints"]):
            if seen.get(c["id"], 0) >= 3:
                continue
            seen[c["id"]] = seen.get(c["id"], 0) + 1
            checker = INSTRUCTION_DICT[c["id"]](c["id"])
            checker.build_description(**c["kwargs"])
            for text in CANNED[1:]:
                assert isinstance(checker.check_following(text), bool), c["id"]
    assert set(seen) == set(ifeval.describe()["used"])


def test_short_answer_constraints_stay_satisfiable() -> None:
    for r in ifeval.build_prompts(3000, seed=8):
        for c in json.loads(r["constraints"]):
            kw = c["kwargs"]
            if c["id"] == "length_constraints:number_words":
                assert kw["num_words"] <= 80
            if c["id"] == "length_constraints:nth_paragraph_first_word":
                assert 1 <= kw["nth_paragraph"] <= kw["num_paragraphs"] <= 3
            if c["id"] in ("length_constraints:number_paragraphs",):
                assert kw["num_paragraphs"] <= 3
            if c["id"] == "detectable_format:multiple_sections":
                assert kw["num_sections"] <= 3


def test_prompt_text_is_rebuilt_from_constraints_alone() -> None:
    # build_description(**kwargs) must reproduce the instruction text in the prompt,
    # i.e. the recorded kwargs are complete.
    for r in ifeval.build_prompts(300, seed=6):
        descriptions = []
        for c in json.loads(r["constraints"]):
            checker = INSTRUCTION_DICT[c["id"]](c["id"])
            descriptions.append(checker.build_description(**c["kwargs"]))
        task = r["prompt"].split("\n", 1)[0]
        assert task in ifeval._BASE_TASKS
        assert r["prompt"] == "\n".join([task, *descriptions])


def test_repeat_prompt_rows_are_alone_and_store_the_request() -> None:
    rows = [r for r in ifeval.build_prompts(2000, seed=1) if "repeat_prompt" in r["constraints"]]
    assert rows
    for r in rows:
        cons = json.loads(r["constraints"])
        # Alone: repeating a request that contains other instructions' text would
        # pass keyword/title checks for free (and fail no_comma).
        assert [c["id"] for c in cons] == ["combination:repeat_prompt"]
        target = cons[0]["kwargs"]["prompt_to_repeat"]
        assert target in ifeval._BASE_TASKS
        assert r["prompt"].startswith(target + "\nFirst repeat the request")
        good = ifeval.reward([r["prompt"]], [target + "\nHere is my answer."], [r["constraints"]])
        bad = ifeval.reward([r["prompt"]], ["Here is my answer."], [r["constraints"]])
        assert (good, bad) == ([1.0], [0.0])


def test_drawn_keywords_never_contradict_each_other() -> None:
    rows = ifeval.build_prompts(3000, seed=12)
    multi_keyword_rows = 0
    for r in rows:
        cons = json.loads(r["constraints"])
        ids = {c["id"] for c in cons}
        assert not {"language:response_language", "length_constraints:nth_paragraph_first_word"} <= ids
        words: list[tuple[int, str]] = []
        for i, c in enumerate(cons):
            kw = c["kwargs"]
            words += [(i, w) for w in kw.get("keywords", []) + kw.get("forbidden_words", [])]
            words += [(i, kw[k]) for k in ("keyword", "first_word") if k in kw]
        multi_keyword_rows += len({i for i, _ in words}) > 1
        for i, a in words:
            assert all(a not in b for j, b in words if j != i), r["constraints"]
        for c in cons:
            if c["id"] == "keywords:letter_frequency" and c["kwargs"]["let_relation"] == "less than":
                assert all(c["kwargs"]["letter"] not in w for _, w in words), r["constraints"]
    assert multi_keyword_rows > 50  # the check above was actually exercised


# ---------------------------------------------------------------------- reward

# (instruction id, kwargs, a response that follows it, a response that does not)
ORACLE = [
    ("keywords:existence", {"keywords": ["garden", "lantern"]}, "The lantern lit the garden.", "The lamp lit the yard."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "My cat is a good cat.", "My cat is lost."),
    ("keywords:forbidden_words", {"forbidden_words": ["lost", "cat"]}, "My dog went missing.", "My cat is lost."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "A quiet day.", "Zany zebras buzz."),
    ("language:response_language", {"language": "es"}, CANNED[-1], "My cat is lost. Please call me if you see her in your garden."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part here.\n***\nSecond part here.", "Only one paragraph."),
    ("length_constraints:number_words", {"num_words": 10, "relation": "less than"}, "Short answer here.", LOWER_NO_COMMA),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"}, "Hello there.\n\nFinally, goodbye.", "Hello there.\n\nGoodbye finally."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet at [place] on [date].", "Meet at [place]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Bye.\nP.S. Bring snacks.", "Bye."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", "*one* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}, "Section 1\nIntro.\nSection 2\nEnd.", "Section 1\nIntro only."),
    ("detectable_format:json_format", {}, '```json\n{"note": "cat lost"}\n```', "cat lost"),
    ("detectable_format:title", {}, "<<Lost Cat>>\nPlease help.", "Lost Cat\nPlease help."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only answer."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Describe your dream house."}, "Describe your dream house. It has a garden.", "My dream house has a garden."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Here you go. Any other questions?", "Any other questions? Here you go."),
    ("change_case:english_capital", {}, UPPER_WITH_COMMAS, LOWER_WITH_COMMAS),
    ("change_case:english_lowercase", {}, LOWER_NO_COMMA, UPPER_WITH_COMMAS),
    ("punctuation:no_comma", {}, LOWER_NO_COMMA, LOWER_WITH_COMMAS),
    ("startend:quotation", {}, '"All quoted."', "Not quoted."),
]  # fmt: skip


def test_oracle_table_covers_every_used_id() -> None:
    assert {o[0] for o in ORACLE} == set(ifeval.describe()["used"])


@pytest.mark.parametrize(("instruction_id", "kwargs", "good", "bad"), ORACLE, ids=[o[0] for o in ORACLE])
def test_each_used_checker_grades_correctly(instruction_id: str, kwargs: dict, good: str, bad: str) -> None:
    assert score([good, bad], row((instruction_id, kwargs))) == [1.0, 0.0]


def test_reward_is_fraction_of_satisfied_constraints() -> None:
    two = row(("change_case:english_lowercase", {}), ("punctuation:no_comma", {}))
    assert score([LOWER_NO_COMMA, UPPER_WITH_COMMAS, LOWER_WITH_COMMAS], two) == [1.0, 0.0, 0.5]

    three = row(
        ("punctuation:no_comma", {}),
        ("detectable_format:title", {}),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}),
    )
    got = score(
        [
            "<<Cat>>\nShe is grey. Any other questions?",  # all three
            "<<Cat>>\nShe is grey, and shy.",  # title only
            "She is grey. Any other questions?",  # no comma + end phrase
            "She is grey, and shy.",  # none
        ],
        three,
    )
    assert got == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])


def test_empty_completion_scores_zero_even_for_negative_constraints() -> None:
    # "" trivially has no commas / forbidden words; it must still earn nothing.
    cons = row(("punctuation:no_comma", {}), ("keywords:forbidden_words", {"forbidden_words": ["cat"]}))
    assert score(["", "  \n", "a dog"], cons) == [0.0, 0.0, 1.0]


def test_raising_checker_counts_as_not_satisfied() -> None:
    # The NLTK punkt data is absent, so this excluded checker raises LookupError.
    cons = row(
        ("length_constraints:number_sentences", {"num_sentences": 1, "relation": "at least"}),
        ("punctuation:no_comma", {}),
    )
    assert score(["One sentence."], cons) == [0.5]


def test_language_checks_are_deterministic() -> None:
    # langdetect is randomised; unseeded, these ambiguous snippets flip between
    # languages from call to call ("pasta pizza": it/lv, "das ist": de/lv).
    for text, lang in (("pasta pizza", "it"), ("das ist", "de")):
        cons = row(("language:response_language", {"language": lang}))
        assert len(set(score([text] * 40, cons))) == 1


def test_reward_recomputable_from_row_alone() -> None:
    rows = ifeval.build_prompts(200, seed=13)
    completions = [CANNED[i % len(CANNED)] for i in range(len(rows))]
    got = ifeval.reward([r["prompt"] for r in rows], completions, [r["constraints"] for r in rows])

    # Independent recomputation: JSON round-trip, fresh checkers from the library.
    for r, text, value in zip(rows, completions, got, strict=True):
        cons = json.loads(json.dumps(json.loads(r["constraints"])))
        passed = 0
        for c in cons:
            checker = INSTRUCTION_DICT[c["id"]](c["id"])
            checker.build_description(**c["kwargs"])
            passed += bool(text.strip()) and bool(checker.check_following(text))
        assert value == pytest.approx(passed / len(cons)), r["prompt_id"]

    # And from a cold cache, the module gives the same numbers.
    ifeval._checkers.cache_clear()
    again = ifeval.reward([r["prompt"] for r in rows], completions, [r["constraints"] for r in rows])
    assert again == got


def test_reward_accepts_trl_conversational_completions_and_extra_columns() -> None:
    cons = row(("punctuation:no_comma", {}))
    plain = ifeval.reward(["p", "p"], ["a b", "a, b"], [cons, cons], prompt_id=["x", "y"])
    chat = ifeval.reward(
        ["p", "p"],
        [[{"role": "assistant", "content": "a b"}], [{"role": "assistant", "content": "a, b"}]],
        [cons, cons],
    )
    assert plain == chat == [1.0, 0.0]


def test_reward_rejects_bad_input() -> None:
    cons = row(("punctuation:no_comma", {}))
    with pytest.raises(ValueError):
        ifeval.reward(["p"], ["a", "b"], [cons])
    with pytest.raises(ValueError):
        ifeval.reward(["p"], ["a"], [row(("no:such_instruction", {}))])
    with pytest.raises(ValueError):
        ifeval.reward(["p"], ["a"], ["[]"])


def test_judge_separates_responses_on_built_prompts() -> None:
    rows = ifeval.build_prompts(200, seed=21)
    cons = [r["constraints"] for r in rows]
    prompts = [r["prompt"] for r in rows]

    empty = ifeval.reward(prompts, [""] * len(rows), cons)
    assert sum(empty) / len(empty) < 0.5

    mixed = ifeval.reward(prompts, [CANNED[i % len(CANNED)] for i in range(len(rows))], cons)
    assert all(0.0 <= x <= 1.0 for x in mixed)
    assert len(set(mixed)) >= 3

    # A response written to the row's constraints beats a generic one on average:
    # here, the same canned text with its commas removed on no_comma rows.
    comma_rows = [i for i, c in enumerate(cons) if "punctuation:no_comma" in c]
    assert comma_rows
    with_commas = ifeval.reward(
        [prompts[i] for i in comma_rows], [LOWER_WITH_COMMAS] * len(comma_rows), [cons[i] for i in comma_rows]
    )
    without = ifeval.reward(
        [prompts[i] for i in comma_rows],
        [LOWER_WITH_COMMAS.replace(",", "")] * len(comma_rows),
        [cons[i] for i in comma_rows],
    )
    assert all(b >= a for a, b in zip(with_commas, without, strict=True))
    assert sum(without) > sum(with_commas)


def test_reward_is_fast() -> None:
    rows = ifeval.build_prompts(1000, seed=17)
    completions = [CANNED[i % len(CANNED)] + f" {i}" for i in range(len(rows))]
    ifeval.reward(["w"], ["warm up langdetect"], [row(("change_case:english_lowercase", {}))])
    ifeval._checkers.cache_clear()
    start = time.perf_counter()
    out = ifeval.reward([r["prompt"] for r in rows], completions, [r["constraints"] for r in rows])
    elapsed = time.perf_counter() - start
    assert len(out) == 1000
    # Measured ~0.3 s on a laptop-class CPU; generous bound to avoid CI flakiness.
    assert elapsed < 5.0, elapsed


def test_describe_reports_reasons() -> None:
    desc = ifeval.describe()
    assert re.match(r"if-verifiable \d", desc["source"])
    assert len(desc["used"]) == len(set(desc["used"])) > 0
    for note in list(desc["excluded"].values()) + list(desc["constrained_kwargs"].values()):
        assert isinstance(note, str) and len(note) > 20
