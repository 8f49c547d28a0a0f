"""Verifiable instruction-following reward built from IFEval's checker registry.

This is the project's embedded default judge. Prompts are short writing tasks
with 1-3 IFEval instructions appended (e.g. "Wrap your entire response with
double quotation marks."); the reward of a completion is the fraction of its
row's instructions that the corresponding IFEval checker accepts.

The checkers come from ``if-verifiable`` (a packaged copy of Google's IFEval
code). Everything here runs offline: the checkers that need NLTK data files
are excluded, and ``langdetect`` (used by the language and case checkers)
ships its profiles inside the package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import langdetect
from if_verifiable.ifeval import instructions_registry

from selfplay.config import PROMPT_FAMILIES

# langdetect is randomised internally; a fixed seed makes detect() (and so the
# language / english_lowercase / english_capital checks) deterministic. This is
# a process-wide setting of langdetect, which is what those checkers call.
langdetect.DetectorFactory.seed = 0

_REGISTRY: dict[str, type] = dict(instructions_registry.INSTRUCTION_DICT)

# Instruction ids we never emit, with the reason (surfaced by describe()).
_EXCLUDED: dict[str, str] = {
    "length_constraints:number_sentences": (
        "needs NLTK punkt data (nltk.data.load of tokenizers/punkt), which is "
        "not installed and must not be downloaded; check_following raises LookupError"
    ),
    "change_case:capital_word_frequency": (
        "needs NLTK punkt_tab data (nltk.word_tokenize), which is not installed "
        "and must not be downloaded; check_following raises LookupError"
    ),
    "detectable_format:constrained_response": (
        "asks to answer with 'My answer is yes/no/maybe.', which only makes sense "
        "for yes/no questions, not our open writing tasks; it also conflicts with "
        "every other instruction and is passed by appending the phrase to anything"
    ),
}

# Why some kwargs are sampled by us instead of by the checker's own defaults:
# the policy writes ~100-token (~80-word) answers, so the IFEval ranges that
# assume long answers would be either unsatisfiable or trivially satisfied.
_CONSTRAINED: dict[str, str] = {
    "length_constraints:number_words": (
        "IFEval draws 100-500 words ('at least 300' is impossible in ~80 words, "
        "'less than 300' is always true); we draw 'at least' 15-60 and "
        "'less than' 25-80"
    ),
    "length_constraints:number_paragraphs": (
        "IFEval draws 1-5 paragraphs; we draw 2-3 so that each paragraph has "
        "room for content in ~80 words and the constraint is never vacuous"
    ),
    "length_constraints:nth_paragraph_first_word": (
        "IFEval draws 1-5 paragraphs and nth_paragraph up to num_paragraphs + 1 "
        "(an off-by-one that makes the check unsatisfiable); we draw 2-3 "
        "paragraphs and 1 <= nth <= num_paragraphs"
    ),
    "detectable_format:multiple_sections": ("IFEval draws 1-5 sections; we draw 2-3 to fit ~80 words"),
    "keywords:letter_frequency": (
        "'less than N' of a common letter (e.g. fewer than 3 'e') is not "
        "realistically satisfiable in 80 words; 'less than' uses only rare "
        "letters (j k q v x z), 'at least' uses any letter"
    ),
    "combination:repeat_prompt": (
        "needs the request to repeat: we store the prompt text before the "
        "instruction as prompt_to_repeat so the row is self-contained; it is "
        "always the only instruction of its row (see _EXTRA_CONFLICTS)"
    ),
}

_REPEAT_PROMPT = "combination:repeat_prompt"

# Instruction ids build_prompts() may emit (sorted for a stable sampling order).
USED_IDS: tuple[str, ...] = tuple(sorted(set(_REGISTRY) - set(_EXCLUDED)))
# Checker families: an id's part before ':' (prompts.eval_only_families holds some out of training).
FAMILIES: tuple[str, ...] = tuple(sorted({i.split(":")[0] for i in USED_IDS}))
if FAMILIES != PROMPT_FAMILIES:  # the config checks prompts.eval_only_families against its copy of this list
    raise ImportError(f"selfplay.config.PROMPT_FAMILIES {PROMPT_FAMILIES} differs from the checkers' families {FAMILIES}")


def family(instruction_id: str) -> str:
    return instruction_id.split(":")[0]


# Conflicts we add on top of IFEval's table.
_EXTRA_CONFLICTS: dict[str, set[str]] = {
    # IFEval lets repeat_prompt pair with keywords:existence, detectable_format:title
    # and punctuation:no_comma, but the repeated request contains their own
    # descriptions: repeating "Include keywords [...]" or "such as <<poem of joy>>"
    # passes those checks for free, and "In your entire response, refrain ..."
    # has a comma, so repeating it fails no_comma. Keep repeat_prompt alone.
    _REPEAT_PROMPT: set(_REGISTRY),
    # A paragraph that must start with a given English word contradicts
    # "your ENTIRE response should be in <language>".
    "language:response_language": {"length_constraints:nth_paragraph_first_word"},
}


def _symmetric_conflicts() -> dict[str, frozenset[str]]:
    """IFEval's INSTRUCTION_CONFLICTS (plus ours) made symmetric (A~B implies B~A, A~A).

    IFEval symmetrises it with ``conflict_make``, which mutates the library's
    dict in place; we build our own copy instead.
    """
    table: dict[str, set[str]] = {k: {k} for k in _REGISTRY}
    for source in (instructions_registry.INSTRUCTION_CONFLICTS, _EXTRA_CONFLICTS):
        for key, others in source.items():
            for other in others:
                table.setdefault(key, {key}).add(other)
                table.setdefault(other, {other}).add(key)
    return {k: frozenset(v) for k, v in table.items()}


_CONFLICTS = _symmetric_conflicts()

_BASE_TASKS: tuple[str, ...] = (
    "Write a short note to a neighbour about a lost cat.",
    "Write a brief thank-you message to a teacher who helped you last year.",
    "Describe your ideal Sunday morning.",
    "Explain to a child why the sky looks blue.",
    "Write a short product description for a reusable water bottle.",
    "Give advice to someone starting their first job.",
    "Write a short review of a coffee shop you like.",
    "Describe the view from a mountain top at sunrise.",
    "Write a short invitation to a friend's birthday picnic.",
    "Explain how to make a cup of tea.",
    "Write a short apology to a friend for missing their party.",
    "Describe a busy train station at rush hour.",
    "Write a short story about a robot learning to paint.",
    "Give three tips for staying focused while studying.",
    "Write a short letter to your future self.",
    "Explain why recycling matters.",
    "Describe your favourite season and why you like it.",
    "Write a brief welcome message for new members of a book club.",
    "Write a short poem about the ocean.",
    "Explain what a rainbow is to a curious ten-year-old.",
    "Write a short complaint to a landlord about a leaking tap.",
    "Describe an old library you once visited.",
    "Write a short speech to congratulate a team on winning a match.",
    "Give advice on how to care for a houseplant.",
    "Write a short note asking a colleague to cover your shift.",
    "Describe the smell and sounds of a bakery in the morning.",
    "Explain how a bicycle works in simple terms.",
    "Write a short story about a dragon who is afraid of heights.",
    "Write a brief announcement that the office will close early on Friday.",
    "Describe a walk through a forest after the rain.",
    "Give tips for packing light for a weekend trip.",
    "Write a short message to cheer up a friend who failed an exam.",
    "Explain why sleep is important for health.",
    "Write a short advertisement for a neighbourhood yard sale.",
    "Describe a street market in a big city.",
    "Write a short fable about a clever fox and a proud crow.",
    "Explain how to plant tomato seeds.",
    "Write a brief reminder to roommates to take out the recycling.",
    "Describe what a lighthouse keeper's day might look like.",
    "Give advice to someone who wants to start running.",
    "Write a short diary entry about a snowy day.",
    "Explain the difference between weather and climate.",
    "Write a short toast for a friend's wedding.",
    "Describe a childhood game you used to play.",
    "Write a short note introducing yourself to a new pen pal.",
    "Explain why people enjoy music.",
    "Write a brief summary of why libraries are useful.",
    "Describe the perfect sandwich.",
    "Write a short story about a lost key that opens a secret door.",
    "Give tips for making a good first impression at an interview.",
    "Write a short message to a hotel asking for a late check-out.",
    "Explain how bees help flowers grow.",
    "Describe a thunderstorm from the point of view of a cat.",
    "Write a short pitch for a mobile app that helps people drink more water.",
    "Write a brief farewell message to a coworker who is leaving.",
    "Explain how to stay safe while hiking alone.",
    "Describe your dream house.",
    "Write a short story about two strangers sharing an umbrella.",
    "Give advice on saving money on groceries.",
    "Write a short note to a mail carrier thanking them for their work.",
    "Explain why the moon changes shape during the month.",
    "Describe a small town fair in summer.",
    "Write a short invitation to a community clean-up day.",
    "Explain what makes a good friend.",
    "Write a short letter to a city council asking for more bike lanes.",
    "Describe the first cup of coffee of the day.",
)


def _sample_number_words(rng: random.Random) -> dict[str, Any]:
    relation = rng.choice(("less than", "at least"))
    num_words = rng.randint(15, 60) if relation == "at least" else rng.randint(25, 80)
    return {"num_words": num_words, "relation": relation}


def _sample_number_paragraphs(rng: random.Random) -> dict[str, Any]:
    return {"num_paragraphs": rng.randint(2, 3)}


def _sample_nth_paragraph(rng: random.Random) -> dict[str, Any]:
    num_paragraphs = rng.randint(2, 3)
    # first_word stays unset: the checker draws it from IFEval's word list.
    return {"num_paragraphs": num_paragraphs, "nth_paragraph": rng.randint(1, num_paragraphs)}


def _sample_sections(rng: random.Random) -> dict[str, Any]:
    # section_spliter stays unset: the checker picks "Section" or "SECTION".
    return {"num_sections": rng.randint(2, 3)}


def _sample_letter_frequency(rng: random.Random) -> dict[str, Any]:
    relation = rng.choice(("less than", "at least"))
    letters = "jkqvxz" if relation == "less than" else "abcdefghijklmnopqrstuvwxyz"
    return {
        "letter": rng.choice(letters),
        "let_frequency": rng.randint(1, 10),
        "let_relation": relation,
    }


# Ids whose kwargs we draw ourselves (see _CONSTRAINED); the others use the
# checker's own random defaults.
_KWARG_SAMPLERS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "length_constraints:number_words": _sample_number_words,
    "length_constraints:number_paragraphs": _sample_number_paragraphs,
    "length_constraints:nth_paragraph_first_word": _sample_nth_paragraph,
    "detectable_format:multiple_sections": _sample_sections,
    "keywords:letter_frequency": _sample_letter_frequency,
}


@contextlib.contextmanager
def _global_random_seeded(seed: int) -> Iterator[None]:
    """Seed the global `random` module (IFEval checkers draw from it), then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _pick_ids(rng: random.Random, k: int, min_constraints: int, candidates: tuple[str, ...] = USED_IDS) -> list[str]:
    """Draw up to k mutually non-conflicting ids (at least min_constraints) from candidates."""
    for _ in range(100):
        order = list(candidates)
        rng.shuffle(order)
        chosen: list[str] = []
        for cand in order:
            if len(chosen) == k:
                break
            if all(cand not in _CONFLICTS[c] for c in chosen):
                chosen.append(cand)
        if len(chosen) >= min_constraints:
            # repeat_prompt must come last: the text before it is what gets repeated.
            chosen.sort(key=lambda i: i == _REPEAT_PROMPT)
            return chosen
    raise ValueError(f"could not draw {min_constraints} non-conflicting instructions")


def _join(parts: list[str]) -> str:
    # One instruction per line: several descriptions are multi-line or end in
    # a literal marker ("divider: ***"), which run-on text would blur.
    return "\n".join(parts)


def _words_of(constraint: dict[str, Any]) -> list[str]:
    """Words a keyword-type constraint requires or forbids (empty for other ids)."""
    kw = constraint["kwargs"]
    if constraint["id"] == "keywords:existence":
        return list(kw["keywords"])
    if constraint["id"] == "keywords:forbidden_words":
        return list(kw["forbidden_words"])
    if constraint["id"] == "keywords:frequency":
        return [kw["keyword"]]
    if constraint["id"] == "length_constraints:nth_paragraph_first_word":
        return [kw["first_word"]]
    return []


def _keywords_consistent(constraints: list[dict[str, Any]]) -> bool:
    """False if independently drawn words could contradict each other.

    The conflict table does not stop e.g. keywords:existence and
    keywords:forbidden_words from drawing the same word, or a required word
    from containing a letter that letter_frequency limits. The keyword checks
    match substrings, so words of different constraints must not contain one
    another, and a rationed letter must not appear in any of them.
    """
    words = [(i, w.lower()) for i, c in enumerate(constraints) for w in _words_of(c)]
    for i, a in words:
        for j, b in words:
            if i != j and a in b:
                return False
    rationed = [
        c["kwargs"]["letter"]
        for c in constraints
        if c["id"] == "keywords:letter_frequency" and c["kwargs"]["let_relation"] == "less than"
    ]
    return not any(letter in w for letter in rationed for _, w in words)


_NUMBER_WORDS = "length_constraints:number_words"
WORD_BUDGET_LINE = "Answer in at most {words} words."


def _build_row(index: int, seed: int, id_prefix: str, min_c: int, max_c: int, word_budget: int | None = None,
               candidates: tuple[str, ...] = USED_IDS) -> dict:
    # Per-row RNG seeded from a string (hashed with SHA-512 by `random`, not by
    # Python's salted hash()), so rows are reproducible across processes and a
    # row does not depend on n.
    rng = random.Random(f"selfplay-ifeval:{seed}:{index}")
    task = rng.choice(_BASE_TASKS)
    for _ in range(100):
        ids = _pick_ids(rng, rng.randint(min_c, max_c), min_c, candidates)
        parts = [task]
        constraints = []
        for instruction_id in ids:
            checker = _REGISTRY[instruction_id](instruction_id)
            if instruction_id == _REPEAT_PROMPT:
                kwargs: dict[str, Any] = {"prompt_to_repeat": _join(parts)}
            elif instruction_id in _KWARG_SAMPLERS:
                kwargs = _KWARG_SAMPLERS[instruction_id](rng)
            else:
                kwargs = {}
            with _global_random_seeded(rng.getrandbits(64)):
                parts.append(checker.build_description(**kwargs))
            # The checker may have filled in random defaults; record what it used.
            # Read it before any check_following (EndChecker lowercases its phrase there).
            constraints.append({"id": instruction_id, "kwargs": checker.get_instruction_args() or {}})
        if _keywords_consistent(constraints):
            # The length the answer should fit, as a last line (not graded): without it the embedded policy runs
            # into the token cap on ~3 answers in 4 and cut-off text fails every end-of-answer check. A row whose
            # own constraint sets a word count keeps that instead.
            if word_budget and not any(c["id"] == _NUMBER_WORDS for c in constraints):
                parts.append(WORD_BUDGET_LINE.format(words=word_budget))
            return {
                "prompt_id": f"{id_prefix}{index:05d}",
                "prompt": _join(parts),
                "constraints": json.dumps(constraints, sort_keys=True),
            }
    raise RuntimeError(f"could not draw consistent constraints for row {index}")


def build_prompts(
    n: int,
    seed: int,
    *,
    min_constraints: int = 1,
    max_constraints: int = 3,
    id_prefix: str = "p",
    word_budget: int | None = None,
    exclude_families: tuple[str, ...] | list[str] = (),
) -> list[dict]:
    """Deterministic list of n prompt rows: {"prompt_id": str, "prompt": str, "constraints": str}.

    prompt = a base writing task followed by the descriptions produced by the
    IFEval checkers' own build_description() with seeded random arguments.
    `constraints` is a JSON list of {"id": instruction_id, "kwargs": {...}}, enough
    to rebuild each checker, so the reward is recomputable from the row alone.
    Constraints in a row never conflict (IFEval's INSTRUCTION_CONFLICTS made
    symmetric, plus _EXTRA_CONFLICTS and a keyword-overlap check). Content depends only on (seed, index); id_prefix only names the
    rows (f"{id_prefix}{index:05d}"), so training and held-out sets are told
    apart by prefix and must use different seeds to get different prompts.
    The global `random` state is left as it was. `word_budget` adds a last, ungraded line asking for at most that
    many words (WORD_BUDGET_LINE) to every row without a word-count constraint of its own; it changes no other text.
    `exclude_families` draws no instruction of those checker families (FAMILIES); empty, the rows are as without it.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_constraints <= max_constraints:
        raise ValueError(f"need 1 <= min_constraints <= max_constraints, got {min_constraints}, {max_constraints}")
    candidates = tuple(i for i in USED_IDS if family(i) not in set(exclude_families))
    return [_build_row(i, seed, id_prefix, min_constraints, max_constraints, word_budget, candidates) for i in range(n)]


@functools.lru_cache(maxsize=65536)
def _checkers(constraints: str) -> tuple[Any, ...]:
    """Rebuild the checkers of one row from its constraints JSON (cached per distinct row)."""
    items = json.loads(constraints)
    if not items:
        raise ValueError("a row must have at least one constraint")
    checkers = []
    for item in items:
        instruction_id = item["id"]
        if instruction_id not in _REGISTRY:
            raise ValueError(f"unknown IFEval instruction id: {instruction_id!r}")
        checker = _REGISTRY[instruction_id](instruction_id)
        # Like if-verifiable: None means "unset", and unset args would be redrawn
        # at random; recorded rows are complete, but a fixed seed keeps even a
        # hand-written partial row deterministic without touching caller state.
        kwargs = {k: v for k, v in (item.get("kwargs") or {}).items() if v is not None}
        with _global_random_seeded(0):
            checker.build_description(**kwargs)
        checkers.append(checker)
    return tuple(checkers)


def _completion_text(completion: Any) -> str:
    """Plain text of a completion; TRL conversational completions are message lists."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"unsupported completion type: {type(completion).__name__}")


def _follows(checker: Any, text: str) -> bool:
    try:
        return bool(checker.check_following(text))
    except Exception:  # a checker that raises counts as not satisfied
        return False


def reward(prompts: list[str], completions: list[str], constraints: list[str], **kwargs: Any) -> list[float]:
    """TRL-style reward: fraction of each row's constraints that its completion satisfies.

    Extra dataset columns arrive as keyword lists (TRL convention); only
    `constraints` is used (`prompts` is accepted for the signature; the
    repeat-prompt checker carries its own copy of the request). As in
    if-verifiable's strict scoring, an empty/whitespace completion satisfies
    nothing (otherwise "" would pass e.g. every "do not use X" check).
    """
    if len(completions) != len(constraints):
        raise ValueError(f"got {len(completions)} completions but {len(constraints)} constraint rows")
    scores = []
    for completion, row in zip(completions, constraints, strict=True):
        checkers = _checkers(row)
        text = _completion_text(completion)
        if not text.strip():
            scores.append(0.0)
            continue
        passed = sum(_follows(c, text) for c in checkers)
        scores.append(passed / len(checkers))
    return scores


def describe() -> dict:
    """Which instruction ids are in use and which are excluded, with a reason each."""
    return {
        "source": f"if-verifiable {metadata.version('if-verifiable')} (Google IFEval checkers)",
        "used": list(USED_IDS),
        "excluded": dict(_EXCLUDED),
        "constrained_kwargs": dict(_CONSTRAINED),
        "scoring": "fraction of the row's constraints satisfied; empty completion scores 0",
    }
