"""trainer=mmpo: MMPO's soft-label loss −p·log σ(βh) − (1−p)·log σ(−βh), p = σ(γ_m·Δex), on DPO's and SimPO's logits.

The formula is torch's binary cross-entropy on logits (not the expression selfplay uses); the trainers' losses are checked against it on fixed tensors and on
a real first training step of the tiny policy, where each pair's p must reach its own row of the loss."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.nn.functional import binary_cross_entropy_with_logits, logsigmoid

from selfplay.backends.chat import prompt_messages, response_messages, training_tokens
from selfplay.backends.trl_trainers import mmpo_cpo_trainer_class
from selfplay.config import Config, ConfigError, conf_dir, register, validate
from selfplay.core.losses import mmpo_loss, soft_labels
from selfplay.stages.train import build_trainer

PAIRS = [
    ("Write a haiku about rain. Use no commas.", "Rain taps the window\nsoft and grey", "no."),
    ("List three fruits in lowercase.", "apple banana cherry", "APPLE, Banana and a very long rambling " * 3),
    ("Say hi.", "hi", "Hello there! How can I help you today?"),
]
MARGINS = [0.1, 1.0, 3.0]  # Δex per pair: p = σ(Δex) ≈ 0.525, 0.731, 0.953 at γ_m = 1
MAX_LENGTH = 256


def formula(h, p, beta):
    """MMPO per pair, from the paper: the cross-entropy of σ(βh) against the soft label p — here torch's own
    binary cross-entropy on logits, an implementation independent of selfplay's mmpo_loss."""
    return binary_cross_entropy_with_logits(beta * h, p, reduction="none")


def test_soft_labels_are_sigmoid_of_scaled_margin():
    p = soft_labels([0.0, 0.5, 2.0, 100.0], 1.5)
    np.testing.assert_allclose(p, [0.5, 1 / (1 + np.exp(-0.75)), 1 / (1 + np.exp(-3.0)), 1.0], rtol=1e-12)
    assert p[-1] == 1.0  # a clear win is exactly the hard label


# -- 1. the loss on fixed tensors equals the formula, per pair, with a different p for each ----------------------------

CHOSEN = torch.tensor([-12.0, -30.5, -7.25, -51.0])
REJECTED = torch.tensor([-15.0, -22.0, -9.0, -40.0])
REF_CHOSEN = torch.tensor([-13.0, -28.0, -8.0, -50.0])
REF_REJECTED = torch.tensor([-14.0, -25.0, -8.5, -45.0])
P = torch.tensor([0.5, 0.62, 0.9, 0.999])


def test_mmpo_loss_on_dpo_logits_matches_formula():
    beta = 0.1
    h = (CHOSEN - REF_CHOSEN) - (REJECTED - REF_REJECTED)
    expected = formula(h, P, beta)
    torch.testing.assert_close(mmpo_loss(h, P, beta), expected, rtol=1e-6, atol=1e-7)
    # at h = 0 the loss is ln 2 whatever p is (σ(0) = ½ against any label)
    torch.testing.assert_close(mmpo_loss(torch.zeros(4), P, beta), torch.full((4,), np.log(2.0)), rtol=0, atol=1e-7)
    # p matters: the hard label (plain DPO) gives another loss for every pair with p < 1
    assert (mmpo_loss(h, torch.ones(4), beta) - expected)[:3].abs().min() > 1e-3


def cpo_stub(trainer_class, chosen_avg, rejected_avg, beta, simpo_gamma):
    """A CPO trainer object without its __init__: TRL's get_batch_loss_metrics/cpo_loss on fixed log-probs."""
    trainer = object.__new__(trainer_class)
    trainer.__dict__.update(beta=beta, simpo_gamma=simpo_gamma, loss_type="simpo", alpha=0.0, cpo_alpha=0.0,
                            label_smoothing=0.0, aux_loss_enabled=False,
                            accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    nll = torch.tensor(0.0)
    trainer.concatenated_forward = lambda model, batch: (chosen_avg, rejected_avg, torch.zeros(4, 2, 3),
                                                         torch.zeros(4, 2, 3), nll)
    return trainer


def test_mmpo_loss_on_simpo_logits_matches_formula():
    beta, simpo_gamma = 2.0, 0.5
    chosen_avg, rejected_avg = CHOSEN / torch.tensor([10, 20, 5, 30]), REJECTED / torch.tensor([12, 9, 6, 25])
    h = (chosen_avg - rejected_avg) - simpo_gamma / beta
    expected = formula(h, P, beta)
    trainer = cpo_stub(mmpo_cpo_trainer_class(), chosen_avg, rejected_avg, beta, simpo_gamma)
    loss, _ = trainer.get_batch_loss_metrics(None, {"soft_label": P.tolist()})
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-6, atol=1e-7)
    # the loss pairs each p with its own row: p in another order gives another loss
    assert abs(loss.item() - formula(h, P.flip(0), beta).mean().item()) > 1e-3
    assert trainer.label_smoothing == 0.0  # the per-batch ε does not outlive the batch
    # and per pair, TRL's cDPO form with ε = 1 − p is the formula
    trainer.label_smoothing = 1 - P
    losses, _, _ = trainer.cpo_loss(chosen_avg, rejected_avg)
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-7)


# -- 2. p → 1 is TRL's plain SimPO / DPO loss ----------------------------------------------------------------------------

def test_hard_label_is_trl_simpo_loss():
    from trl.experimental.cpo import CPOTrainer

    beta, simpo_gamma = 2.0, 0.5
    chosen_avg, rejected_avg = CHOSEN / 10, REJECTED / 10
    p = soft_labels([100.0] * 4, 1.0)  # σ(100) is 1.0 in float64
    assert (p == 1.0).all()
    loss, _ = cpo_stub(mmpo_cpo_trainer_class(), chosen_avg, rejected_avg, beta, simpo_gamma).get_batch_loss_metrics(
        None, {"soft_label": p.tolist()})
    trl_losses, _, _ = CPOTrainer.cpo_loss(cpo_stub(CPOTrainer, chosen_avg, rejected_avg, beta, simpo_gamma),
                                           chosen_avg, rejected_avg)
    torch.testing.assert_close(loss, trl_losses.mean(), rtol=1e-6, atol=1e-7)
    h = (CHOSEN - REF_CHOSEN) - (REJECTED - REF_REJECTED)
    torch.testing.assert_close(mmpo_loss(h, torch.ones(4), 0.1), -logsigmoid(0.1 * h))  # the DPO sigmoid loss


def config(objective, **trainer):
    cfg = OmegaConf.structured(Config)
    cfg.device = "cpu"
    cfg.precision = "fp32"  # the formulas are checked to 1e-4..1e-6: fp32 arithmetic on every processor
    cfg.trainer.objective = objective
    cfg.trainer.batch_size = len(PAIRS)  # one step sees every pair
    cfg.trainer.epochs = 1  # and there is one step
    cfg.trainer.max_length = MAX_LENGTH
    cfg.trainer.learning_rate = 1e-3
    cfg.trainer.save_steps = 0
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg


def policy_logps(policy, objective):
    """Per pair: (chosen, rejected) log-prob sums and token counts under the policy, by the margin stage's code (which
    sees the tokens TRL's trainers see, tests/test_trl_equivalence.py), not by the trainer's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfplay.backends.batching import token_budget_batches
    from selfplay.backends.logprobs import completion_logps

    tokenizer = AutoTokenizer.from_pretrained(policy)
    sequences = [training_tokens(tokenizer, p, text, objective, MAX_LENGTH) for p, c, r in PAIRS for text in (c, r)]
    batches = token_budget_batches([len(p) + len(c) for p, c in sequences], 2)
    sums, counts = completion_logps(AutoModelForCausalLM.from_pretrained(policy), sequences, torch.device("cpu"),
                                    batches, tokenizer.pad_token_id)
    sums, counts = torch.tensor(np.asarray(sums), dtype=torch.float64), torch.tensor(np.asarray(counts))
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def selected_frame(margins, ref_chosen=None, ref_rejected=None):
    frame = pd.DataFrame({"prompt": [prompt_messages(p) for p, _, _ in PAIRS],
                          "chosen": [response_messages(c) for _, c, _ in PAIRS],
                          "rejected": [response_messages(r) for _, _, r in PAIRS],
                          "margin_explicit": margins})
    if ref_chosen is not None:  # trainer.reuse_reference_logps reads π_r's sums (no model.reference) from here
        frame["logp_chosen_sum"], frame["logp_rejected_sum"] = ref_chosen, ref_rejected
    return frame


def first_step_loss(cfg, policy, selected, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = build_trainer(cfg, AutoModelForCausalLM.from_pretrained(policy), AutoTokenizer.from_pretrained(policy),
                            selected, str(tmp_path))
    trainer.train()
    assert trainer.state.global_step == 1
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


# -- 3. a built trainer's first step: its loss is the formula of each pair's own p and logit ---------------------------

def test_mmpo_dpo_first_step_loss_is_formula_per_pair(tiny_policy, tmp_path):
    beta = 0.1
    chosen, rejected, _, _ = policy_logps(tiny_policy, "dpo")
    # A reference that is not π_r itself, so that h differs per pair (with π_r as reference h = 0 at the first step).
    ref_chosen, ref_rejected = chosen - torch.tensor([10.0, -5.0, 2.0]), rejected - torch.tensor([-5.0, 5.0, -2.0])
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    p = torch.tensor(soft_labels(MARGINS, 1.0))
    expected = formula(h, p, beta).mean().item()
    # The check can tell: p ignored (hard labels) or p paired with other rows give other losses.
    assert abs(expected - formula(h, torch.ones(3, dtype=torch.float64), beta).mean().item()) > 1e-2
    assert abs(expected - formula(h, p.roll(1), beta).mean().item()) > 1e-2

    selected = selected_frame(MARGINS, ref_chosen.tolist(), ref_rejected.tolist())
    loss = first_step_loss(config("mmpo", mmpo_logits="dpo", beta=beta, gamma=1.0), tiny_policy, selected,
                           tmp_path / "mmpo")
    assert loss == pytest.approx(expected, abs=1e-4)
    # p = 1 (huge margins): TRL's own DPO loss, by the plain trainer=dpo on the same pairs
    hard = selected_frame([100.0] * 3, ref_chosen.tolist(), ref_rejected.tolist())
    mmpo_hard = first_step_loss(config("mmpo", beta=beta), tiny_policy, hard, tmp_path / "hard")
    dpo = first_step_loss(config("dpo", beta=beta), tiny_policy, hard, tmp_path / "dpo")
    assert mmpo_hard == pytest.approx(dpo, abs=1e-6)
    assert dpo == pytest.approx(-logsigmoid(beta * h).mean().item(), abs=1e-4)


def test_mmpo_dpo_with_reference_model_and_no_reuse(tiny_policy, smol_tokenizer, tmp_path):
    """trainer.reuse_reference_logps=false: TRL's own precompute pass over model.reference fills the batch's
    reference log-probs, next to the soft labels."""
    from selfplay.testing import make_policy

    beta, margins = 1.0, [3.0, 0.1, 0.1]  # two random tiny models differ little: |h| < 1
    reference = make_policy(smol_tokenizer, tmp_path / "reference", seed=1)
    chosen, rejected, _, _ = policy_logps(tiny_policy, "dpo")
    ref_chosen, ref_rejected, _, _ = policy_logps(reference, "dpo")
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    p = torch.tensor(soft_labels(margins, 1.0))
    expected = formula(h, p, beta).mean().item()
    assert abs(expected - formula(h, torch.ones(3, dtype=torch.float64), beta).mean().item()) > 1e-2

    cfg = config("mmpo", beta=beta, gamma=1.0, reuse_reference_logps=False)
    cfg.model.reference = str(reference)
    assert first_step_loss(cfg, tiny_policy, selected_frame(margins), tmp_path / "run") == pytest.approx(expected,
                                                                                                        abs=1e-4)


def test_mmpo_simpo_first_step_loss_is_formula_per_pair(tiny_policy, tmp_path):
    beta, simpo_gamma = 2.0, 0.5
    chosen, rejected, n_chosen, n_rejected = policy_logps(tiny_policy, "simpo")
    h = (chosen / n_chosen - rejected / n_rejected) - simpo_gamma / beta
    margins = [0.05, 0.5, 4.0]
    p = torch.tensor(soft_labels(margins, 1.0))
    expected = formula(h, p, beta).mean().item()
    assert abs(expected - formula(h, torch.ones(3, dtype=torch.float64), beta).mean().item()) > 1e-2
    assert min(abs(expected - formula(h, p[list(order)], beta).mean().item())
               for order in ((1, 2, 0), (2, 0, 1), (1, 0, 2), (0, 2, 1), (2, 1, 0))) > 1e-3

    cfg = config("mmpo", mmpo_logits="simpo", beta=beta, gamma=1.0, simpo_gamma=simpo_gamma)
    assert first_step_loss(cfg, tiny_policy, selected_frame(margins), tmp_path) == pytest.approx(expected, abs=1e-4)


# -- config -------------------------------------------------------------------------------------------------------------

def composed(*overrides):
    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_trainer_mmpo_preset():
    cfg = composed("trainer=mmpo")
    validate(cfg)
    t = cfg.trainer
    assert (t.objective, t.mmpo_logits, t.beta, t.gamma) == ("mmpo", "dpo", 0.1, 1.0)
    dpo = composed("trainer=dpo").trainer
    assert (t.learning_rate, t.epochs, t.batch_size, t.warmup_ratio) == (dpo.learning_rate, dpo.epochs, dpo.batch_size,
                                                                  dpo.warmup_ratio)
    validate(composed("trainer=mmpo", "trainer.mmpo_logits=simpo"))
    validate(composed("trainer=mmpo", "model.reference=/some/ref"))  # dpo logits take a reference model


@pytest.mark.parametrize(("overrides", "option"), [
    (["trainer.mmpo_logits=orpo"], "trainer.mmpo_logits"),
    (["trainer.gamma=0"], "trainer.gamma"),
    (["trainer.gamma=-1"], "trainer.gamma"),
    (["trainer.mmpo_logits=simpo", "model.reference=/some/ref"], "trainer.mmpo_logits"),
])
def test_mmpo_bad_values_fail_naming_the_option(overrides, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        validate(composed("trainer=mmpo", *overrides))
