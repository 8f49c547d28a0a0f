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

import logging
import re
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("selfplay")

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


def evolve_prompts(prompts: pd.DataFrame, cfg: Any, policy_path: Any, device: Any, seed: int,
                   label: str = "evolve") -> tuple[pd.DataFrame, dict[str, int]]:
    """The evolved rows for `prompts` (a seeded choice of prompts.evolve of them) and the filter counts."""
    from .samplers import SamplingSpec, build_sampler

    p, s = cfg.prompts, cfg.sampler
    builtin = p.source == "builtin"
    candidates = prompts
    if builtin and "constraints" in prompts:
        candidates = prompts[~prompts["constraints"].str.contains("repeat_prompt", regex=False)]
    rng = np.random.default_rng(seed)
    chosen = candidates.iloc[np.sort(rng.permutation(len(candidates))[: min(p.evolve, len(candidates))])]
    chosen = chosen.reset_index(drop=True)
    parts = [split_rewritable(text, builtin) for text in chosen["prompt"]]
    requests = [p.evolve_instruction.replace("{prompt}", head) for head, _ in parts]
    counts = {"evolve_candidates": len(chosen)}
    if not requests:
        return prompts.iloc[:0].assign(evolved_from=pd.Series(dtype=str)), counts
    spec = SamplingSpec(n=1, max_new_tokens=p.evolve_max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                        seed=seed, batch_size=s.batch_size)
    with build_sampler(cfg, policy_path, device) as sampler:
        completions = sampler.generate(requests, spec, desc=label, keys=[str(k) for k in chosen["prompt_id"]])
    rewrites = [""] * len(chosen)
    for c in completions:
        text = clean_rewrite(c.response)
        rewrites[c.prompt_index] = " ".join(text.split()) if builtin else text  # a task is one line
    kept, reasons = keep_rewrites([head for head, _ in parts], [tail for _, tail in parts], rewrites,
                                  p.evolve_max_length_ratio, set(prompts["prompt"]))
    counts.update(reasons)
    rows = []
    for i in kept:
        row = chosen.iloc[i].to_dict()
        row.update(prompt_id=f"{row['prompt_id']}~evolved", prompt=rewrites[i] + parts[i][1],
                   evolved_from=str(row["prompt_id"]))
        rows.append(row)
    counts["evolved"] = len(rows)
    log.info("%s: %d of %d rewrites kept (empty %d, unchanged %d, length ratio %d, duplicate %d)", label, len(rows),
             len(chosen), counts["evolve_empty"], counts["evolve_unchanged"], counts["evolve_length_ratio"],
             counts["evolve_duplicate"])
    return pd.DataFrame(rows, columns=[*prompts.columns, "evolved_from"]), counts
