"""Length-bucketed batches under a token budget, for the forward-only passes (log-prob rescoring, reward scoring).

Sequences go longest first (ties by position), and a batch takes rows while rows × its longest sequence — the padded
size the forward pays for — stays within `max_tokens`, and it has at most `max_rows` rows. Short sequences then
share big batches and long ones small batches, so memory per batch is bounded and little compute goes to padding.
The batches depend on the lengths alone: a shard (selfplay/rundir/shards.py) takes a contiguous range of them and computes
exactly what one process computes.
"""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into batches of ≤ max_rows rows and ≤ max_tokens padded tokens
    (a sequence longer than the budget runs alone; max_tokens None: fixed batches of max_rows)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's first sequence sets its padded width.
        full = len(current) >= max_rows or (
            max_tokens is not None and current and (len(current) + 1) * lengths[current[0]] > max_tokens)
        if full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: Sequence[int], batches: list[list[int]]) -> float:
    """Share of the padded tokens that are padding (0 when every batch holds equal lengths)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded if padded else 0.0
