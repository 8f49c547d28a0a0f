"""MAP, z-scores, ranking and pairing against values computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from selfplay.core.selection import keep_count, map_score, select, zscore
from selfplay.stages.pair import make_pairs


def test_zscore_uses_population_std():
    # mean 2, population variance ((1)^2 + 0 + 1^2)/3 = 2/3
    z = zscore(np.array([1.0, 2.0, 3.0]))
    s = math.sqrt(2 / 3)
    assert z == pytest.approx([-1 / s, 0.0, 1 / s])


def test_zscore_constant_pool_is_zero():
    assert zscore(np.array([0.4, 0.4, 0.4])).tolist() == [0.0, 0.0, 0.0]
    assert zscore(np.array([5.0])).tolist() == [0.0]


def test_map_score_by_hand():
    ex = np.array([1.0, 0.5, 0.0])  # mean 0.5, population std sqrt(0.5/3)
    im = np.array([-0.2, 0.1, 0.3])  # |im| = [0.2, 0.1, 0.3]: mean 0.2, population std sqrt(0.02/3)
    s_ex = math.sqrt((0.5**2 + 0.0 + 0.5**2) / 3)
    s_im = math.sqrt((0.0**2 + 0.1**2 + 0.1**2) / 3)
    z_ex = [0.5 / s_ex, 0.0, -0.5 / s_ex]
    z_im = [0.0, (0.1 - 0.2) / s_im, (0.3 - 0.2) / s_im]
    for w in (0.0, 1.0, 2.5):
        expected = [a - w * b for a, b in zip(z_ex, z_im, strict=True)]
        assert map_score(ex, im, w) == pytest.approx(expected)


def test_map_uses_absolute_implicit_margin():
    # Same |Δim|, opposite signs: MAP must score them the same.
    assert map_score(np.array([1.0, 1.0, 0.0]), np.array([0.5, -0.5, 0.1]), 1.0)[:2].tolist() == pytest.approx([
        map_score(np.array([1.0, 1.0, 0.0]), np.array([0.5, 0.5, 0.1]), 1.0)[0]] * 2)


def pairs_frame():
    return pd.DataFrame(
        {
            "prompt_id": ["a", "b", "c", "d"],
            "margin_explicit": [0.9, 0.2, 0.9, 0.5],
            "margin_implicit": [2.0, 0.0, -0.1, 1.0],
        }
    )


def test_select_map_ranks_large_explicit_small_implicit_first():
    out = select(pairs_frame(), "map", weight=1.0, top_k=2)
    # c: big Δex, |Δim| small -> best; a: big Δex but the policy already separates it (|Δim| = 2).
    assert out["prompt_id"].tolist()[0] == "c"
    assert out["rank"].tolist() == [1, 2]
    assert set(out.columns) >= {"metric", "score", "rank"}
    ex, im = pairs_frame()["margin_explicit"].to_numpy(), pairs_frame()["margin_implicit"].to_numpy()
    full = dict(zip("abcd", map_score(ex, im, 1.0), strict=True))
    assert out["score"].tolist() == pytest.approx([full[p] for p in out["prompt_id"]])


def test_select_baselines():
    assert select(pairs_frame(), "explicit", top_k=3)["prompt_id"].tolist() == ["a", "c", "d"]  # ties keep id order
    assert select(pairs_frame(), "implicit", top_k=2)["prompt_id"].tolist() == ["b", "c"]
    assert len(select(pairs_frame(), "all")) == 4
    r1 = select(pairs_frame(), "random", top_k=2, seed=7)["prompt_id"].tolist()
    assert r1 == select(pairs_frame(), "random", top_k=2, seed=7)["prompt_id"].tolist()
    assert {tuple(select(pairs_frame(), "random", top_k=2, seed=s)["prompt_id"]) for s in range(20)} != {tuple(r1)}


def test_keep_count_ratio_rounds_up_and_caps():
    assert keep_count(10, None, 0.25, "map") == 3
    assert keep_count(10, 4, 0.9, "map") == 4  # top_k wins over ratio
    assert keep_count(3, 5, None, "map") == 3
    assert keep_count(7, 2, None, "all") == 7


def scores_frame(rows):
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "sample_idx", "response", "reward"])


def test_best_vs_worst_pairs_and_counts_ties():
    df = scores_frame([
        ("p1", "q1", 0, "r10", 0.5), ("p1", "q1", 1, "r11", 1.0), ("p1", "q1", 2, "r12", 0.0),
        ("p2", "q2", 0, "r20", 0.3), ("p2", "q2", 1, "r21", 0.3),  # all tie -> dropped
        ("p3", "q3", 0, "r30", 1.0), ("p3", "q3", 1, "r31", 1.0), ("p3", "q3", 2, "r32", 0.0), ("p3", "q3", 3, "r33", 0.0),
    ])
    pairs, ties = make_pairs(df, "best_worst")
    assert ties == 1
    assert pairs["prompt_id"].tolist() == ["p1", "p3"]
    p1 = pairs.iloc[0]
    assert p1["chosen"] == [{"role": "assistant", "content": "r11"}]
    assert p1["rejected"] == [{"role": "assistant", "content": "r12"}]
    assert p1["prompt"] == [{"role": "user", "content": "q1"}]
    assert p1["margin_explicit"] == pytest.approx(1.0)
    # equal rewards: chosen = lowest sample index, rejected = highest
    assert (pairs.iloc[1]["chosen_sample_idx"], pairs.iloc[1]["rejected_sample_idx"]) == (0, 3)


def test_min_margin_turns_small_gaps_into_ties():
    df = scores_frame([("p", "q", 0, "a", 0.50), ("p", "q", 1, "b", 0.55), ("r", "s", 0, "c", 0.0), ("r", "s", 1, "d", 1.0)])
    pairs, ties = make_pairs(df, "best_worst", min_margin=0.1)
    assert ties == 1 and pairs["prompt_id"].tolist() == ["r"]


# ---- selection beyond the paper: weight=auto, the signed variant, REAL, pairing strategies, compare arms ----

def test_auto_weight_is_the_correlation_floored_at_zero():
    from selfplay.core.selection import auto_weight

    ex = np.array([0.9, 0.2, 0.5, 0.7, 0.1])
    im = np.array([0.8, -0.1, 0.3, -0.6, 0.05])
    expected = np.corrcoef(ex, np.abs(im))[0, 1]
    assert expected > 0
    assert auto_weight(ex, im) == pytest.approx(expected)
    assert auto_weight(ex, im, signed=True) == pytest.approx(max(0.0, np.corrcoef(ex, im)[0, 1]))
    # Policy margins that run against the judge's: nothing to discount, MAP falls back to the explicit margin.
    assert auto_weight(ex, -ex * 0.1 + 1.0) == 0.0
    assert auto_weight(ex, np.full(5, 0.3)) == 0.0  # a constant policy margin carries nothing


def test_map_signed_variant_by_hand():
    ex = np.array([1.0, 0.5, 0.0])
    im = np.array([-0.2, 0.1, 0.3])  # signed: mean 0.0667, population std of [-0.2, 0.1, 0.3]
    z_ex = (ex - ex.mean()) / ex.std()
    z_im = (im - im.mean()) / im.std()
    assert map_score(ex, im, 1.5, signed=True) == pytest.approx(z_ex - 1.5 * z_im)
    # A pair the policy orders the wrong way round (Δim < 0) ranks above its mirror image under signed, not under |Δim|.
    flip = np.array([1.0, 1.0, 0.0]), np.array([0.5, -0.5, 0.1])
    signed = map_score(*flip, 1.0, signed=True)
    assert signed[1] > signed[0]
    assert map_score(*flip, 1.0)[0] == pytest.approx(map_score(*flip, 1.0)[1])


def test_select_auto_weight_recorded_and_used():
    from selfplay.core.selection import auto_weight

    pairs = pairs_frame()
    out = select(pairs, "map", weight="auto", top_k=4)
    w = auto_weight(pairs["margin_explicit"].to_numpy(), pairs["margin_implicit"].to_numpy())
    assert out["map_weight"].unique().tolist() == [pytest.approx(w)]
    by_id = dict(zip(pairs["prompt_id"], map_score(pairs["margin_explicit"], pairs["margin_implicit"], w), strict=True))
    assert out["score"].tolist() == pytest.approx([by_id[p] for p in out["prompt_id"]])


def test_select_real_keeps_least_similar_pairs():
    pairs = pairs_frame().assign(real_similarity=[0.9, 0.1, 0.5, 0.95])
    assert select(pairs, "real", top_k=2)["prompt_id"].tolist() == ["b", "c"]
    with pytest.raises(ValueError, match="real_similarity"):
        select(pairs_frame(), "real", top_k=2)


def test_pair_strategies():
    df = scores_frame([
        ("p1", "q1", 0, "a", 0.5), ("p1", "q1", 1, "b", 1.0), ("p1", "q1", 2, "c", 0.0), ("p1", "q1", 3, "d", 0.5),
        ("p2", "q2", 0, "e", 0.3), ("p2", "q2", 1, "f", 0.3),
    ])
    every, ties = make_pairs(df, "all")
    # p1: 6 pairs of 4 samples minus the one tie (a, d); p2 ties throughout.
    assert ties == 1 and len(every) == 5
    assert (every["margin_explicit"] > 0).all()
    assert set(zip(every["chosen_sample_idx"], every["rejected_sample_idx"], strict=True)) == {(1, 0), (0, 2), (1, 2), (1, 3), (3, 2)}
    assert len(make_pairs(df, "all", min_margin=0.5)[0]) == 1  # only b vs c differs by more than 0.5
    seen = set()
    for seed in range(30):
        pairs, ties = make_pairs(df, "best_random", seed=seed)
        assert ties == 1 and pairs["chosen_sample_idx"].tolist() == [1]
        seen.add(int(pairs["rejected_sample_idx"].iloc[0]))
        assert make_pairs(df, "best_random", seed=seed)[0].equals(pairs)  # seeded
    assert seen == {0, 2, 3}  # any lower-reward sample, not only the worst


def test_pairing_returns_positions_into_the_unsorted_input():
    """core/pairing works on arrays in any row order: positions point back into them, pairs come in prompt order."""
    from selfplay.core import pairing

    ids = np.array(["p2", "p1", "p2", "p1", "p1"], dtype=object)
    sample = np.array([1, 2, 0, 0, 1])
    reward = np.array([0.0, 1.0, 1.0, 0.5, 0.5])
    chosen, rejected, ties = pairing.best_worst(ids, sample, reward)
    assert (chosen.tolist(), rejected.tolist(), ties) == ([1, 2], [4, 0], 0)  # p1: idx 2 vs idx 1 (highest index)
    chosen, rejected, ties = pairing.all_pairs(ids, sample, reward)
    assert list(zip(chosen.tolist(), rejected.tolist(), strict=True)) == [(1, 3), (1, 4), (2, 0)]
    assert ties == 0
    with pytest.raises(ValueError, match="unknown pair strategy 'best'"):
        pairing.make_pairs(ids, sample, reward, "best")


def test_select_several_pairs_per_prompt_keeps_them_apart():
    pairs = pd.DataFrame({"prompt_id": ["a", "a", "b"], "chosen_sample_idx": [1, 1, 0], "rejected_sample_idx": [0, 2, 1],
                          "margin_explicit": [0.2, 0.9, 0.5], "margin_implicit": [0.0, 0.0, 0.0]})
    out = select(pairs, "explicit", top_k=2)
    assert list(zip(out["prompt_id"], out["rejected_sample_idx"], strict=True)) == [("a", 2), ("b", 1)]


def test_compare_arms_parse():
    from selfplay.config import parse_arm
    from selfplay.errors import SelfplayError

    assert parse_arm("map") == {"metric": "map"}
    assert parse_arm("map-auto") == {"metric": "map", "weight": "auto"}
    assert parse_arm("map-w2.5-signed") == {"metric": "map", "weight": 2.5, "signed": True}
    assert parse_arm("real") == {"metric": "real"}
    for bad in ("mapp", "random-auto", "map-wheavy", "map-fast"):
        with pytest.raises(SelfplayError, match="compare.arms"):
            parse_arm(bad)


def test_prompt_evolution_filters_and_cleaning():
    from selfplay.core.evolve import clean_rewrite, keep_rewrites, split_rewritable

    assert clean_rewrite('Rewritten task: "Explain recycling to a chemist."\n\nThis version is harder because…') == \
        "Explain recycling to a chemist."
    assert clean_rewrite("**Task:** Write a sonnet.") == "Write a sonnet."
    assert split_rewritable("Explain X.\nUse no commas.\nEnd with Bye.", builtin=True) == \
        ("Explain X.", "\nUse no commas.\nEnd with Bye.")
    assert split_rewritable("Explain X.\nMore.", builtin=False) == ("Explain X.\nMore.", "")
    heads = ["Explain recycling.", "Explain recycling.", "Write a poem.", "Describe a cat.", "Sum 2 and 2.", "Plan a trip."]
    tails = ["\nNo commas.", "\nNo commas.", "", "", "", ""]
    rewrites = ["Explain recycling to experts, with costs.", "Explain recycling to experts, with costs.", "",
                "Describe a cat.", "Sum two numbers and explain each step of the proof in full detail " * 3,
                "Plan a three-day trip."]
    kept, counts = keep_rewrites(heads, tails, rewrites, 5.0, existing={"Plan a three-day trip."})
    assert kept == [0]
    assert counts == {"evolve_empty": 1, "evolve_unchanged": 1, "evolve_length_ratio": 1, "evolve_duplicate": 2}


def test_mu_minus_2sigma_pairing_by_hand():
    """13 samples: μ = 7.2/13 = 0.5538, σ = √(0.6523/13) = 0.2240, μ − 2σ = 0.1058. The rejected is 0.2 (0.094 away),
    not the minimum 0.0 (0.106 away); the chosen is the 1.0."""
    from selfplay.core import pairing

    reward = np.array([1.0] + [0.6] * 10 + [0.2, 0.0])
    chosen, rejected, ties = pairing.best_mu2sigma(np.array(["p"] * 13, dtype=object), np.arange(13), reward)
    assert (chosen.tolist(), rejected.tolist(), ties) == ([0], [11], 0)
    # the rejected must lie more than min_margin below the chosen: at 0.85 only the 0.0 does
    assert pairing.best_mu2sigma(np.array(["p"] * 13, dtype=object), np.arange(13), reward, 0.85)[1].tolist() == [12]
    # all within min_margin: a tie
    assert pairing.best_mu2sigma(np.array(["p"] * 2, dtype=object), np.arange(2), np.array([0.5, 0.4]), 0.2)[2] == 1


def test_mu_minus_2sigma_pairs_like_best_worst_up_to_five_samples():
    """With N ≤ 5 no reward lies below μ − 2σ (the minimum is ≥ μ − σ√(N−1)): the rule picks the minimum."""
    from selfplay.core import pairing

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 6))
        ids, sample, reward = np.array(["a"] * n + ["b"] * n, dtype=object), np.r_[np.arange(n), np.arange(n)], \
            rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=2 * n)
        a, b = pairing.best_mu2sigma(ids, sample, reward), pairing.best_worst(ids, sample, reward)
        assert [x.tolist() if hasattr(x, "tolist") else x for x in a] == [x.tolist() if hasattr(x, "tolist") else x
                                                                           for x in b]


def test_the_pair_stage_takes_best_mu2sigma_by_name():
    rows = [("p", "q", i, f"r{i}", r) for i, r in enumerate([1.0] + [0.6] * 10 + [0.2, 0.0])]
    pairs, ties = make_pairs(scores_frame(rows), "best_mu2sigma")
    assert ties == 0 and pairs[["chosen_sample_idx", "rejected_sample_idx"]].values.tolist() == [[0, 11]]
    assert pairs["margin_explicit"].tolist() == pytest.approx([0.8])
