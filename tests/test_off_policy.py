"""One step behind (off_policy_steps=1) in the colocated loop: step t trains on rollouts sampled
with the weights after max(t - 1, 0) updates, the sampled-token losses weigh each token (chunk) by
the truncated importance ratio, the sampler check compares against the weights the sampler holds,
and a resume makes the rollouts of an uninterrupted run."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint
from safetensors.torch import load_file
from test_run_guards import distill_runner, log

from losses import chunk_opd_loss, output_loss_chunk


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("off_policy")
    return (make_checkpoint(root / "teacher", "qwen3", seed=3),
            make_checkpoint(root / "student", "qwen3", seed=4))


@pytest.fixture
def distill(settings_restored, monkeypatch, capsys):
    """distill(pair, out, **kw): distill.main() in this process with the guards' tiny settings,
    opd one step behind unless kw says otherwise; returns (exit status, stderr lines)."""
    return distill_runner(settings_restored.main, monkeypatch, capsys, method="opd",
                          off_policy_steps=1)


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_each_step_samples_with_the_weights_one_update_old(pair, tmp_path, distill, monkeypatch):
    """The sampler's weights at each generate() call, by the step whose prompts it samples (its
    seed): steps 0 and 1 from the first weights, step 2 from those after one update (the step-1
    checkpoint). The check never sees the lag: every gap stays at rounding."""
    from sampler import TorchSampler
    real = TorchSampler.generate
    calls = {}

    def recording(self, prompts, **kw):
        calls[kw["seed"]] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return real(self, prompts, **kw)

    monkeypatch.setattr(TorchSampler, "generate", recording)
    out = tmp_path / "o"
    code, err = distill(pair, out, save_every=1, keep_checkpoints=3)
    assert code == 0, err[-20:]
    assert sorted(calls) == [0, 1, 2]
    first = weights(pair[1])
    after_one = weights(out / "step_0000001")
    for step, want in ((0, first), (1, first), (2, after_one)):
        for name, tensor in calls[step].items():
            assert torch.equal(tensor, want[name]), (step, name)
    assert not torch.equal(first["lm_head.weight"], after_one["lm_head.weight"])
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["sampler_logp_gap"] < 1e-4 for r in rows[:2])


@pytest.mark.parametrize("method", ["opd", "opd_chunk", "oprd"])
def test_a_resume_makes_the_rollouts_of_an_uninterrupted_run(pair, tmp_path, distill, method):
    """Stopped after step 1 and resumed: the checkpoint carries step 2's rollouts (sampled with the
    weights after one update), so steps 2 and 3 are bit for bit those of the run that never
    stopped."""
    whole = tmp_path / "whole"
    code, err = distill(pair, whole, method=method, max_steps=4, save_every=1)
    assert code == 0, err[-20:]
    cut = tmp_path / "cut"
    code, err = distill(pair, cut, method=method, max_steps=4, save_every=1, stop_step=2)
    assert code == 0, err[-20:]
    code, err = distill(pair, cut, method=method, max_steps=4, save_every=1, init_from="resume")
    assert code == 0, err[-20:]
    keys = ("loss", "grad_norm", "mean_response_len", "sampler_logp_gap")
    assert [[r[k] for k in keys] for r in log(cut)] == [[r[k] for k in keys] for r in log(whole)]


def test_on_policy_the_weight_changes_nothing(pair, tmp_path, distill):
    """off_policy_steps=0: the sampler's log-probs are the student's within rounding (every ratio
    is 1), and importance_cap does not enter the loss."""
    runs = {}
    for cap in (0, 2):
        out = tmp_path / f"cap{cap}"
        code, err = distill(pair, out, off_policy_steps=0, importance_cap=cap)
        assert code == 0, err[-20:]
        runs[cap] = log(out)
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[2]]
    assert all(r["sampler_logp_gap"] < 1e-4 for r in runs[2])


def test_a_sampler_that_misses_its_sync_still_stops_the_run(pair, tmp_path, distill, monkeypatch):
    """One step behind, an engine that keeps its first weights: step 1 checks step 2's rollouts,
    sampled with those, against the weights after one update."""
    from sampler import TorchSampler
    monkeypatch.setattr(TorchSampler, "update_weights", lambda self, named: None)
    code, err = distill(pair, tmp_path / "stale", max_steps=4)
    assert code == 1
    assert "step 1: stale sampler weights" in err[-1], err[-5:]


@pytest.mark.parametrize("settings, message", [
    (dict(off_policy_steps=2), "off_policy_steps=2: must be 0 or 1"),
    (dict(method="sft"), "off_policy_steps=1 with method=sft"),
    (dict(importance_cap=0.5), "importance_cap=0.5: must be 0 (off) or >= 1"),
])
def test_bad_settings_are_one_line(pair, tmp_path, distill, settings, message):
    code, err = distill(pair, tmp_path / "o", **settings)
    assert code == 1 and message in err[-1], err[-3:]
    assert not os.path.exists(tmp_path / "o")


# ----------------------------------------------------------------------- the weight, by hand

def test_the_truncated_importance_weight_by_hand():
    """opd's token terms and opd_chunk's chunk terms, each weighed by min(p_S / p_sampler, cap):
    loss and gradient against a per-row loop."""
    g = torch.Generator().manual_seed(0)
    n, d, V = 6, 8, 11
    h_s = torch.randn(n, d, generator=g, requires_grad=True)
    h_t = torch.randn(n, d, generator=g)
    w_s = torch.randn(V, d, generator=g)
    w_t = torch.randn(V, d, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    sampler_lp = -torch.rand(n, generator=g) * 8
    cap = 2.0
    loss, _, _ = output_loss_chunk("opd", h_s, h_t, targets, w_s, w_t, V, 0, sampler_lp, cap)
    (grad,) = torch.autograd.grad(loss, h_s)
    hand = 0.0
    for i in range(n):
        lp_s = F.log_softmax(h_s[i] @ w_s.T, -1)[targets[i]]
        lp_t = F.log_softmax(h_t[i] @ w_t.T, -1)[targets[i]]
        ratio = min(float((lp_s.detach() - sampler_lp[i]).exp()), cap)
        hand = hand + ratio * float(lp_s.detach() - lp_t) * lp_s
    (hand_grad,) = torch.autograd.grad(hand, h_s)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-5, atol=1e-6)
    # some ratios are capped, some not: both branches matter
    ratios = (F.log_softmax(h_s @ w_s.T, -1).gather(1, targets[:, None])[:, 0]
              - sampler_lp).exp()
    assert (ratios > cap).any() and (ratios < cap).any()

    lp_s = torch.randn(7, generator=g).mul(0.5).sub(2).requires_grad_(True)
    lp_t = torch.randn(5, generator=g).mul(0.5).sub(2)
    lp_q = torch.randn(7, generator=g).mul(0.5).sub(2)
    s_spans = [[0, 2], [2, 3], [3, 7]]
    t_spans = [[0, 1], [1, 3], [3, 5]]
    loss, _ = chunk_opd_loss(lp_s, lp_t, s_spans, t_spans, lp_q, cap)
    hand = 0.0
    for (a, b), (c, e) in zip(s_spans, t_spans):
        l_s = lp_s[a:b].sum()
        ratio = min(float((l_s.detach() - lp_q[a:b].sum()).exp()), cap)
        hand = hand + ratio * float(l_s.detach() - lp_t[c:e].sum()) * l_s
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, lp_s)
    (hand_grad,) = torch.autograd.grad(hand, lp_s)
    torch.testing.assert_close(grad, hand_grad)


def hf_logprobs(folder, prompt, response):
    """log p of each response token under the checkpoint in folder, read by transformers."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    predicting = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[predicting, torch.tensor(response)]


# one tokenizer: opd_chunk's chunks are single tokens
@pytest.mark.parametrize("method", ["opd", "opd_chunk"])
def test_the_logged_importance_weight_is_that_of_transformers_log_probs(pair, tmp_path, distill,
                                                                        monkeypatch, method):
    """log.jsonl's importance_weight_mean and importance_capped_share: step 0 trains on rollouts
    of its own weights (every weight 1); step 1 on those of the first weights, each token weighed
    by min(p_1 / p_0, cap), which transformers computes here from the two checkpoints."""
    from sampler import TorchSampler
    real = TorchSampler.generate
    drawn = {}

    def recording(self, prompts, **kw):
        samples = real(self, prompts, **kw)
        drawn[kw["seed"]] = (prompts, samples)
        return samples

    monkeypatch.setattr(TorchSampler, "generate", recording)
    out = tmp_path / "o"
    cap = 1.02
    code, err = distill(pair, out, method=method, max_steps=2, save_every=1, keep_checkpoints=2,
                        importance_cap=cap)
    assert code == 0, err[-20:]
    rows = log(out)
    assert rows[0]["importance_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["importance_capped_share"] == 0.0
    prompts, samples = drawn[1]
    weights = []
    for prompt, row in zip(prompts, samples):
        for sample in row:
            after = hf_logprobs(out / "step_0000001", prompt, sample.tokens)
            before = hf_logprobs(pair[1], prompt, sample.tokens)
            weights.append((after - before).exp())
    ratio = torch.cat(weights)
    weight = ratio.clamp(max=cap).mean().item()
    assert rows[1]["importance_weight_mean"] == pytest.approx(weight, rel=1e-5)
    capped = (ratio >= cap).float().mean().item()
    assert rows[1]["importance_capped_share"] == pytest.approx(capped)
    # lr 3e-2 moves the student far in one update: some ratios pass the cap, some do not
    assert 0 < capped < 1
