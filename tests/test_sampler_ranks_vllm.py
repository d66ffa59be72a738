"""A sampler rank's vLLM engine (rollout_ranks=1, backend=vllm): an engine that is a world of its
own, beside a trainer rank that starts none. In a file of its own, so that pytest-xdist runs it
beside test_sampler_ranks.py: its three processes each import vLLM. On gloo."""

import pytest
from test_run_guards import log
from test_sampler_ranks import assert_close_steps, colocated_runner, one_tokenizer_pair, torchrun


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return one_tokenizer_pair(tmp_path_factory.mktemp("sampler_ranks_vllm"))


@pytest.fixture
def colocated(settings_restored, monkeypatch, capsys):
    return colocated_runner(settings_restored, monkeypatch, capsys)


@pytest.mark.skipif(not __import__("rollout").vllm_available(), reason="vLLM is not installed")
def test_a_vllm_sampler_rank_serves_the_trainer(models, tmp_path, colocated):
    """The sampler rank's vLLM engine, a world of one beside a rank that starts none: greedy
    rollouts on-policy (the trainer waits for each step's), the same steps as the torch sampler's
    colocated run (the two samplers draw the same greedy tokens from a tiny fp32 model), and a
    clean exit."""
    settings = dict(method="oprd", temperature=0.0, off_policy_steps=0, max_steps=2)
    colocated(models, tmp_path / "colocated", **settings)
    p = torchrun(2, models, tmp_path / "split", rollout_ranks=1, **dict(settings, backend="vllm"))
    assert "its core in a child process" in p.stdout
    assert_close_steps(log(tmp_path / "split"), log(tmp_path / "colocated"))
