"""distill.py's losses against direct reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from batch import DistillError, response_masks
from losses import depth_map, log_softmax_, oprd_loss, output_loss, output_loss_chunk, parse_layers
from model import Transformer


def test_oprd_equals_formula_and_gradient():
    torch.manual_seed(0)
    N, d = 7, 12
    h_s = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(N, d, dtype=torch.float64)
    loss, cos = oprd_loss(h_s, h_t, 'mse')
    want = sum(((h_s[i] - h_t[i]) ** 2).sum() / d for i in range(N))
    torch.testing.assert_close(loss.double(), want)
    torch.testing.assert_close(cos.double(), F.cosine_similarity(h_s, h_t, dim=-1).sum().detach())
    loss.backward()
    torch.testing.assert_close(h_s.grad, (2 / d) * (h_s - h_t).detach(), rtol=1e-6, atol=1e-6)


def test_oprd_normalized_mse_is_two_one_minus_cos_over_d():
    torch.manual_seed(1)
    h_s, h_t = torch.randn(5, 8), torch.randn(5, 8)
    loss, cos = oprd_loss(h_s, h_t, 'normalized_mse')
    want = (2 * (1 - F.cosine_similarity(h_s, h_t, dim=-1)) / 8).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_oprd_zero_with_zero_gradient_for_the_same_model(tiny_qwen3):
    student = Transformer.from_pretrained(tiny_qwen3)
    teacher = Transformer.from_pretrained(tiny_qwen3).requires_grad_(False)
    idx = torch.randint(0, student.config.vocab_size, (2, 9))
    L = student.config.num_hidden_layers
    hs = student(idx, taps=range(1, L + 1))
    with torch.no_grad():
        ht = teacher(idx, taps=range(1, L + 1))
    loss = sum(oprd_loss(hs[l].flatten(0, 1), ht[l].flatten(0, 1))[0] for l in range(1, L + 1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())


def dist_rows(V=11, N=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(N, V, generator=g, dtype=torch.float64)
    z_t = torch.randn(N, V, generator=g, dtype=torch.float64)
    return z_s, z_t


def test_full_kl_equals_sum_p_log_p_over_q():
    z_s, z_t = dist_rows()
    # identity "LM head": rows are the logits themselves
    eye = torch.eye(z_s.shape[1], dtype=torch.float64)
    targets = torch.zeros(3, dtype=torch.long)
    loss, kl, _ = output_loss('opd_full', z_s, z_t, targets, eye, eye, 11, 0, chunk=2)
    p, q = z_s.softmax(-1), z_t.softmax(-1)
    want = (p * (p / q).log()).sum()
    torch.testing.assert_close(loss.double(), want)
    assert math.isclose(kl, want.item(), rel_tol=1e-6)


def test_full_kl_chunked_equals_unchunked_with_gradient():
    z_s, z_t = dist_rows(V=13, N=10, seed=3)
    eye = torch.eye(13, dtype=torch.float64)
    grads = []
    for chunk in (3, 100):
        z = z_s.clone().requires_grad_(True)
        targets = torch.zeros(10, dtype=torch.long)
        loss, _, _ = output_loss('opd_full', z, z_t, targets, eye, eye, 13, 0, chunk)
        loss.backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_full_kl_gradient_made_in_forward_equals_autograd():
    """opd_full's FullKL makes its gradient in the forward pass: loss, and gradients to the
    student's states and head (rows beyond the common vocabulary get none), equal autograd through
    the plain formula, in chunks that do not divide the rows, scaled by whatever gradient comes from
    above; and it hands over log p_S of each row's target (the sampler check reads them)."""
    g = torch.Generator().manual_seed(4)
    d, V, vocab, N = 6, 13, 11, 7
    h_s, h_t = (torch.randn(N, d, generator=g, dtype=torch.float64) for _ in range(2))
    w_s = torch.randn(V, d, generator=g, dtype=torch.float64)
    w_t = torch.randn(12, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (N,), generator=g)
    grads = []
    for fused in (True, False):
        h = h_s.clone().requires_grad_(True)
        w = w_s.clone().requires_grad_(True)
        if fused:
            loss, kl, target_logp = output_loss('opd_full', h, h_t, targets, w, w_t, vocab, 0,
                                                chunk=3)
        else:
            z_s = (h @ w.T)[:, :vocab]
            z_t = (h_t @ w_t.T)[:, :vocab]
            loss = (z_s.softmax(-1) * (z_s.log_softmax(-1) - z_t.log_softmax(-1))).sum()
        (2.5 * loss).backward()
        grads.append((loss.detach(), h.grad, w.grad))
    # the loss is fp32
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6, check_dtype=False)
    assert math.isclose(kl, grads[1][0].item(), rel_tol=1e-6)
    assert grads[0][2][vocab:].abs().max() == 0 and grads[0][2][:vocab].abs().min() > 0
    want = (h_s @ w_s.T)[:, :vocab].log_softmax(-1)[torch.arange(N), targets]
    assert not target_logp.requires_grad and torch.allclose(target_logp.double(), want, rtol=1e-5)


def test_log_softmax_in_place_is_torch_s_bit_for_bit():
    """FullKL's log-softmax over a contiguous CPU tensor is written over it, bit for bit
    F.log_softmax's; a view of the common vocabulary (not contiguous) gets a new tensor and is left
    as it was."""
    z = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)) * 30
    want, before = F.log_softmax(z, dim=-1), z.clone()
    out = log_softmax_(z)
    assert out.data_ptr() == z.data_ptr() and torch.equal(out, want)
    view = before.clone()[:, :999]
    out = log_softmax_(view)
    assert out.data_ptr() != view.data_ptr() and torch.equal(out, F.log_softmax(view, dim=-1))
    assert torch.equal(view, before[:, :999])


def test_sampled_token_gradient_approaches_full_kl_gradient():
    """E_y~p[sg(log p(y) - log q(y)) grad log p(y)] = grad KL(p || q): check by Monte Carlo."""
    V, S = 6, 200_000
    z_s, z_t = dist_rows(V=V, N=1, seed=5)
    eye = torch.eye(V, dtype=torch.float64)
    z = z_s.clone().requires_grad_(True)
    first = torch.zeros(1, dtype=torch.long)
    kl, _, _ = output_loss_chunk('opd_full', z, z_t, first, eye, eye, V, 0)
    kl.backward()
    exact = z.grad.clone()
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(z_s.softmax(-1)[0], S, replacement=True, generator=g)
    z = z_s.clone().requires_grad_(True)
    loss, _, _ = output_loss_chunk('opd', z.expand(S, V), z_t.expand(S, V), y, eye, eye, V, 0)
    (loss / S).backward()
    assert (z.grad - exact).abs().max() < 0.02 * exact.abs().max() + 1e-3
    # a single sample is far from the mean: the variance that OPRD does not have
    z = z_s.clone().requires_grad_(True)
    one, _, _ = output_loss_chunk('opd', z, z_t, y[:1], eye, eye, V, 0)
    one.backward()
    assert (z.grad - exact).abs().max() > 0.02 * exact.abs().max()


def test_topk_matches_its_formula():
    V, k = 9, 4
    z_s, z_t = dist_rows(V=V, N=3, seed=7)
    eye = torch.eye(V, dtype=torch.float64)
    z = z_s.clone().requires_grad_(True)
    targets = torch.zeros(3, dtype=torch.long)
    loss, kl, _ = output_loss_chunk('opd_topk', z, z_t, targets, eye, eye, V, k)
    want = 0.0
    lp_s, lp_t = z_s.log_softmax(-1), z_t.log_softmax(-1)
    z2 = z_s.clone().requires_grad_(True)
    lp = z2.log_softmax(-1)
    for i in range(3):
        top = sorted(range(V), key=lambda v: -lp_s[i, v].item())[:k]
        p_bar = torch.tensor([lp_s[i, v].exp().item() for v in top], dtype=torch.float64)
        p_bar = p_bar / p_bar.sum()
        for j, v in enumerate(top):
            want = want + p_bar[j] * (lp_s[i, v] - lp_t[i, v]).item() * lp[i, v]
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)  # the losses run in fp32
    loss.backward()
    want.backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-6)


def test_vocab_common_prefix():
    z_s, z_t = dist_rows(V=10, N=2, seed=9)
    w_s = torch.eye(10, dtype=torch.float64)
    # teacher pads to 12
    w_t = torch.eye(12, 10, dtype=torch.float64)
    targets = torch.zeros(2, dtype=torch.long)
    loss, _, _ = output_loss_chunk('opd_full', z_s, z_t, targets, w_s, w_t, 10, 0)
    p, q = z_s.softmax(-1), z_t.softmax(-1)
    torch.testing.assert_close(loss.double(), (p * (p / q).log()).sum(), rtol=1e-5, atol=1e-6)


def test_layer_sets_and_depth_map():
    assert parse_layers('last', 28) == [28]
    assert parse_layers('all', 4) == [1, 2, 3, 4]
    assert parse_layers('even', 5) == [2, 4] and parse_layers('odd', 5) == [1, 3, 5]
    assert parse_layers('3,1', 4) == [1, 3] and parse_layers([2], 4) == [2]
    out_of_range = r"layers \[9\] out of range: the student has layers 0..4"
    with pytest.raises(DistillError, match=out_of_range):
        parse_layers('1,9', 4)
    with pytest.raises(DistillError, match="expected last, all"):
        parse_layers('middle', 4)
    assert [depth_map(l, 28, 28) for l in (1, 14, 28)] == [1, 14, 28]
    # Qwen3-1.7B (28) <- Qwen3-4B (36): ends align
    assert [depth_map(l, 28, 36) for l in (1, 28)] == [1, 36]
    assert depth_map(14, 28, 36) == round(13 * 35 / 27) + 1
    assert depth_map(0, 3, 6) == 0


def test_depth_map_rounds_ties_up():
    """phi(l) = round((l-1)(L_T-1)/(L_S-1)) + 1 with halves rounded up
    (Python's round() sends 2.5 to 2): exact arithmetic over every pair of depths up to 40,
    ties at .5 included."""
    from fractions import Fraction
    assert depth_map(2, 3, 6) == 4      # 2.5 -> 3, not 2
    assert depth_map(3, 5, 2) == 2      # 0.5 -> 1, not 0
    assert depth_map(2, 3, 4) == 3      # 1.5 -> 2
    ties = 0
    for L_s in range(2, 41):
        for L_t in range(1, 41):
            for l in range(1, L_s + 1):
                q = Fraction((l - 1) * (L_t - 1), L_s - 1)
                ties += q.denominator == 2
                assert depth_map(l, L_s, L_t) == math.floor(q + Fraction(1, 2)) + 1, (l, L_s, L_t)
    assert ties > 100
    # a one-layer student aligns with the last layer
    assert [depth_map(l, 1, 5) for l in (0, 1)] == [0, 5]


def test_position_sets_and_alignment():
    # two rows: prompt of 2 then 4 response tokens; prompt of 3 then 2 response tokens then a pad
    resp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    tok = response_masks(resp, 'all', 0, 'token')
    assert tok.equal(resp)
    pred = response_masks(resp, 'all', 0, 'predict')
    assert pred.tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    last = response_masks(resp, 'last_k', 3, 'token')
    assert last.long().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    first = response_masks(resp, 'first_k', 1, 'token')
    assert first.long().tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]]
