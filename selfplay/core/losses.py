"""MMPO's loss (arXiv 2410.03145) as pure functions: the judge's margins give soft labels, and logits with soft labels
give the loss per pair. The trainers that feed TRL's logits to it are in selfplay/backends/trl_trainers.py.

    soft_labels([0.0, 2.0], gamma=1.0)   → [0.5, 0.881]         p = σ(γ_m·Δex)
    mmpo_loss(h, p, beta)                 → −p·log σ(βh) − (1−p)·log σ(−βh), per pair
"""

from __future__ import annotations

from typing import Any

import numpy as np


def soft_labels(margin_explicit: Any, gamma: float) -> np.ndarray:
    """MMPO's soft label per pair, p = σ(γ_m·Δex): how sure the judge's reward margin Δex ≥ 0 makes `chosen ≻
    rejected` (½ at a tie, → 1 as the margin grows)."""
    return 1.0 / (1.0 + np.exp(-gamma * np.asarray(margin_explicit, dtype=np.float64)))


def mmpo_loss(logits: Any, soft_label: Any, beta: float) -> Any:
    """MMPO's loss per pair (torch tensors in and out): the cross-entropy of σ(β·h) against the soft label p,
    −p·log σ(βh) − (1−p)·log σ(−βh). It is the cDPO label-smoothing form with ε = 1 − p; p = 1 gives the plain
    sigmoid loss of DPO/SimPO."""
    import torch.nn.functional as F

    return -soft_label * F.logsigmoid(beta * logits) - (1 - soft_label) * F.logsigmoid(-beta * logits)
