"""Prompt evolution (the self-play setting of arXiv 2503.01864): the round's policy rewrites some of the round's
prompts into harder variants, which join the round's prompts. A step of the prompts stage, on with prompts.evolve=K.

    selfplay run prompts.evolve=16                    16 of each round's prompts get a harder twin written by π_r

What is rewritten: a file's prompt whole; a built-in prompt's task line only (its first line), with its checkable
constraints kept word for word after it, so the judge grades the variant exactly as it grades the original (prompts
whose constraints quote the prompt itself, IFEval's repeat-prompt, are not rewritten).
Filters, each counted in the prompts stage's manifest: an empty rewrite, one equal to its original, one whose length
in characters changed by more than prompts.evolve_max_length_ratio× either way, and duplicates.
Rows: prompt_id `<original id>~evolved`, the original's other columns (e.g. `constraints`), and `evolved_from`.
"""

from __future__ import annotations

import re

# A label the model may put before its answer ("Rewritten task: …", "Task: …").
_LABEL = re.compile(r"^\s*(?:\**\s*)?(?:rewritten|new|harder)?\s*(?:task|prompt|version)\s*:\s*(?:\**)\s*", re.I)


def clean_rewrite(text: str) -> str:
    """The rewrite itself: the first paragraph, without a leading label or wrapping quotes."""
    text = _LABEL.sub("", text.strip())
    text = text.split("\n\n", 1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def split_rewritable(prompt: str, builtin: bool) -> tuple[str, str]:
    """(the part the policy rewrites, the part kept after it): a built-in prompt's task line and its constraints."""
    if not builtin:
        return prompt, ""
    task, _, rest = prompt.partition("\n")
    return task, ("\n" + rest) if rest else ""


def keep_rewrites(heads: list[str], tails: list[str], rewrites: list[str], max_length_ratio: float,
                  existing: set[str]) -> tuple[list[int], dict[str, int]]:
    """Indices of the rewrites that pass the filters, and how many each filter dropped."""
    counts = {"evolve_empty": 0, "evolve_unchanged": 0, "evolve_length_ratio": 0, "evolve_duplicate": 0}
    kept, seen = [], set(existing)
    for i, (head, tail, new) in enumerate(zip(heads, tails, rewrites, strict=True)):
        ratio = max(len(new), 1) / max(len(head), 1)
        reason = ("evolve_empty" if not new.strip() else "evolve_unchanged" if new.strip() == head.strip()
                  else "evolve_length_ratio" if not 1 / max_length_ratio <= ratio <= max_length_ratio
                  else "evolve_duplicate" if new + tail in seen else None)
        if reason:
            counts[reason] += 1
            continue
        seen.add(new + tail)
        kept.append(i)
    return kept, counts
