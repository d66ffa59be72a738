"""One update, by hand. losses.micro_batch_loss for every method against a reference written here
from transformers' output_hidden_states and logits (each rollout alone, no padding; no call into
losses.py): the output-loss targets, the OPRD positions, phi, the mean over layers, mu, division by
the global counts. Then the optimizer side: lr_at's schedule, clipping, weight decay on matrices
only, and one whole in-process step of distill.main() (rollouts -> loss -> AdamW) against the same
reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint

from bridge import Bridge
from batch import Rollout, StepCounts, collate, supervise
from losses import Maps, make_plan, micro_batch_loss
from model import Transformer

# three rollouts of different lengths in one micro-batch: a per-sequence mean and a token mean
# differ
_g = torch.Generator().manual_seed(0)
ROLLOUTS = [(torch.randint(0, 384, (p,), generator=_g).tolist(),
             torch.randint(0, 384, (r,), generator=_g).tolist())
            for p, r in ((3, 9), (5, 2), (2, 6))]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tokenizer-free checkpoints: a student (3 layers, d=64, V=384), a deeper teacher of another
    vocabulary size (5 layers, V=400: the common prefix is 384) and a wider one (4 layers, d=96)."""
    root = tmp_path_factory.mktemp("step")
    return {"student": make_checkpoint(root / "s", tokenizer=False, seed=4),
            "deep": make_checkpoint(root / "d", tokenizer=False, seed=3, num_hidden_layers=5,
                                    vocab_size=400),
            "wide": make_checkpoint(root / "w", tokenizer=False, seed=5, hidden_size=96,
                                    num_hidden_layers=4, num_attention_heads=3)}


# phi by hand, round((l-1)(L_T-1)/(L_S-1)) + 1 from L_S = 3: deep (5) 1, 3, 5; wide (4) 1, 3
# (1.5 rounds up), 4
CASES = {  # name: settings; t_layers is the teacher layer of each student layer, written out
    "oprd": dict(method="oprd", teacher="deep", layers=[1, 2, 3], t_layers=[1, 3, 5],
                 positions="last_k", k=4),
    "opd": dict(method="opd", teacher="deep"),
    # one tokenizer: every chunk is one token, so opd's terms
    "opd_chunk": dict(method="opd_chunk", teacher="deep"),
    "opd_chunk+oprd": dict(method="opd_chunk+oprd", teacher="deep", mu=10.0, layers=[2, 3],
                           t_layers=[3, 5], positions="last_k", k=3),
    "opd_topk": dict(method="opd_topk", teacher="deep", topk=5),
    "opd_full": dict(method="opd_full", teacher="deep", chunk=3),
    "opd+oprd": dict(method="opd+oprd", teacher="deep", mu=10.0, layers=[1, 3], t_layers=[1, 5],
                     positions="all", align="token"),
    "opd_topk+oprd": dict(method="opd_topk+oprd", teacher="deep", topk=4, coef=0.5, mu=2.0,
                          layers=[2, 3], t_layers=[3, 5], positions="first_k", k=3,
                          distance="normalized_mse"),
    "sft": dict(method="sft", teacher=None),
    "projector": dict(method="oprd", teacher="wide", layers=[1, 2, 3], t_layers=[1, 3, 4],
                      positions="last_k", k=4, projector=True),
    "bridge": dict(method="oprd_bridge", teacher="wide", layers=[1, 2, 3], t_layers=[1, 3, 4],
                   positions="all", distance="normalized_mse", bridge=True),
}


def case(name):
    c = dict(layers=[], t_layers=[], positions="last_k", k=2000, align="predict", distance="mse",
             mu=1.0, coef=1.0, topk=16, chunk=1024, projector=False, bridge=False)
    c.update(CASES[name])
    return c


# ----------------------------------------------------------------------------- the reference

def supervised_positions(P, R, c):
    """The positions OPRD aligns in one rollout of prompt length P and response length R: response
    token j (at position P + j) if the position set keeps it, carried by the state that predicts it
    (P + j - 1) or its own."""
    keep = [j for j in range(R)
            if c["positions"] == "all"
            or (c["positions"] == "first_k" and j < c["k"])
            or (c["positions"] == "last_k" and j >= R - c["k"])]
    return [P + j - (c["align"] == "predict") for j in keep]


def hf_forward(model, ids):
    out = model(torch.tensor([ids]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states], out.logits[0]


def output_term(method, lp_s, lp_t, y, topk):
    """One position's output-space loss and its KL estimate; lp_* are log-probs over the common
    vocabulary."""
    if method == "sft":
        return -lp_s[y], 0.0
    if method in ("opd", "opd+oprd", "opd_chunk", "opd_chunk+oprd"):
        u = (lp_s[y] - lp_t[y]).detach()
        return u * lp_s[y], u.item()
    if method in ("opd_topk", "opd_topk+oprd"):
        top = lp_s.detach().topk(topk).indices
        p_bar = lp_s.detach()[top].exp() / lp_s.detach()[top].exp().sum()
        diff = (lp_s[top] - lp_t[top]).detach()
        return (p_bar * diff * lp_s[top]).sum(), (p_bar * diff).sum().item()
    p = lp_s.exp()  # opd_full: KL(p || q) over the vocabulary, every term differentiable
    kl = (p * (lp_s - lp_t)).sum()
    return kl, kl.item()


def reference(c, rollouts, stu, tea, proj=None, bridge=None):
    """The loss of the rollouts (a token mean over all of them), its KL sum, each layer's OPRD sum
    and cosine sum, and the per-sequence mean of the same terms (which the token mean must not be).
    stu, tea: transformers models; proj: {layer: W (d_T, d_S)}; bridge:
    {layer: (mu_T, P_T, P_S)}."""
    method = c["method"]
    n_out = sum(len(r) for _, r in rollouts)
    n_rep = sum(len(supervised_positions(len(p), len(r), c)) for p, r in rollouts)
    weight = c["coef"] * (c["mu"] if "+" in method else 1.0)
    out = 0.0
    kl = 0.0
    layer_sum = [0.0] * len(c["layers"])
    layer_cos = [0.0] * len(c["layers"])
    per_seq = 0.0
    for p, r in rollouts:
        hs_s, logits_s = hf_forward(stu, p + r)
        if tea is not None:
            with torch.no_grad():
                hs_t, logits_t = hf_forward(tea, p + r)
        seq_out, seq_rep = 0.0, 0.0
        if method not in ("oprd", "oprd_bridge"):
            V = stu.config.vocab_size
            for j, y in enumerate(r):  # token y is predicted by the position before it
                lp_s = logits_s[len(p) + j - 1, :V].log_softmax(-1)
                lp_t = logits_t[len(p) + j - 1, :V].log_softmax(-1) if tea is not None else None
                term, e = output_term(method, lp_s, lp_t, y, c["topk"])
                out, kl, seq_out = out + term, kl + e, seq_out + term
        for i, (ls, lt) in enumerate(zip(c["layers"], c["t_layers"])):
            for pos in supervised_positions(len(p), len(r), c):
                a, b = hs_s[ls][pos], hs_t[lt][pos]
                if proj is not None:
                    a = proj[ls] @ a
                if bridge is not None:
                    mean, p_t, p_s = bridge[ls]
                    a, b = p_s @ a, p_t @ (b - mean)
                layer_cos[i] += F.cosine_similarity(a, b, dim=0).item()
                if c["distance"] == "normalized_mse":
                    a, b = a / a.norm(), b / b.norm()
                term = ((a - b) ** 2).sum() / a.shape[0]
                layer_sum[i] = layer_sum[i] + term
                seq_rep = seq_rep + term / len(c["layers"])
        per_seq = (per_seq + (seq_out / len(r) if method not in ("oprd", "oprd_bridge") else 0.0)
                   + weight * seq_rep / max(1, len(supervised_positions(len(p), len(r), c))))
    loss = out / n_out if method not in ("oprd", "oprd_bridge") else 0.0
    if c["layers"]:
        loss = loss + weight * sum(layer_sum) / len(c["layers"]) / n_rep
    return loss, kl, layer_sum, layer_cos, per_seq / len(rollouts), n_out, n_rep


# ----------------------------------------------------------------------------- the code under test

def code_path(plan, batches, stu, tea, n_out, n_rep, proj, bridge):
    """distill.train's micro-batch loop without the process group: teacher rows at b.keep, student
    taps, micro_batch_loss, backward. Returns the summed loss and stats."""
    loss_sum, stats_sum = 0.0, {"kl": 0.0, "layer_loss": [0.0] * len(plan.s_layers),
                                "layer_cos": [0.0] * len(plan.s_layers)}
    for b in batches:
        with torch.no_grad():
            rows_t = None
            if tea is not None:
                taps = tea(b.ids, attention_mask=b.attention_mask, taps=plan.t_taps)
                rows_t = {layer: h[b.keep] for layer, h in taps.items()}
        hs_s = stu(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
        head_t = tea.lm_head.weight if tea is not None else None
        maps = Maps(stu.lm_head.weight, head_t, proj, bridge)
        loss, stats = micro_batch_loss(plan, b, hs_s, rows_t, StepCounts(n_out, n_rep), maps)
        loss.backward()
        loss_sum += loss.item()
        stats_sum["kl"] += stats.kl
        for j in range(len(plan.s_layers)):
            stats_sum["layer_loss"][j] += stats.layer_loss[j]
            stats_sum["layer_cos"][j] += stats.layer_cos[j]
    return loss_sum, stats_sum


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batch_loss_by_hand(ckpts, name):
    """Loss, logged statistics and every gradient (student, projector) of micro_batch_loss equal the
    reference, for the three rollouts in one micro-batch and split over two (the counts are the
    step's, not the batch's)."""
    from transformers import AutoModelForCausalLM
    c = case(name)
    torch.manual_seed(0)
    hf_stu = AutoModelForCausalLM.from_pretrained(ckpts["student"], dtype=torch.float32)
    hf_tea = (AutoModelForCausalLM.from_pretrained(ckpts[c["teacher"]], dtype=torch.float32)
              if c["teacher"] else None)
    d_s, d_t = 64, hf_tea.config.hidden_size if hf_tea is not None else 64
    proj_w = {l: 0.1 * torch.randn(d_t, d_s) for l in c["layers"]} if c["projector"] else None
    bridge_fits = {l: (torch.randn(d_t), torch.linalg.qr(torch.randn(d_t, 8))[0].T.contiguous(),
                       torch.randn(8, d_s))
                   for l in c["layers"]} if c["bridge"] else None

    ref_proj = {l: w.clone().requires_grad_(True) for l, w in proj_w.items()} if proj_w else None
    want, kl, layer_sum, layer_cos, per_seq, n_out, n_rep = reference(
        c, ROLLOUTS, hf_stu, hf_tea, ref_proj, bridge_fits)
    want.backward()
    # the rollouts tell the two reductions apart
    assert abs(per_seq - want.item()) > 1e-3 * abs(want.item())

    runs = []
    for split in ([ROLLOUTS], [ROLLOUTS[:2], ROLLOUTS[2:]]):
        stu = Transformer.from_pretrained(ckpts["student"])
        tea = (Transformer.from_pretrained(ckpts[c["teacher"]]).requires_grad_(False)
               if c["teacher"] else None)
        plan = make_plan(c["method"], stu.config, tea.config if tea else None,
                         c["layers"] or "all", c["positions"], c["k"], c["align"], c["distance"],
                         c["coef"], c["mu"], c["topk"], c["chunk"])
        assert plan.s_layers == c["layers"] and plan.t_layers == c["t_layers"]
        batches = [supervise(collate([Rollout(p, r, "stop") for p, r in part], 0, "cpu"), plan)
                   for part in split]
        assert sum(b.out_mask.sum().item() for b in batches) == n_out
        assert sum(b.oprd_mask.sum().item() for b in batches) == (n_rep if c["layers"] else 0)
        proj = (torch.nn.ModuleDict({str(l): torch.nn.Linear(d_s, d_t, bias=False)
                                     for l in c["layers"]})
                if proj_w else None)
        if proj is not None:
            with torch.no_grad():
                for l, w in proj_w.items():
                    proj[str(l)].weight.copy_(w)
        bridge = Bridge(bridge_fits) if bridge_fits else None
        loss, stats = code_path(plan, batches, stu, tea, n_out, n_rep, proj, bridge)
        runs.append((loss, stats, stu, proj))

    grads_ref = {n: p.grad for n, p in hf_stu.named_parameters() if p.grad is not None}
    for loss, stats, stu, proj in runs:
        assert loss == pytest.approx(want.item(), rel=2e-5, abs=1e-7)
        assert stats["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        for j in range(len(c["layers"])):
            assert stats["layer_loss"][j] == pytest.approx(layer_sum[j].item(), rel=2e-5)
            assert stats["layer_cos"][j] == pytest.approx(layer_cos[j], rel=1e-4, abs=1e-5)
        grads = {n: p.grad for n, p in stu.named_parameters() if p.grad is not None}
        assert grads.keys() == grads_ref.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, grads_ref[n], rtol=1e-3,
                                       atol=1e-5 * grads_ref[n].abs().max().item() + 1e-9,
                                       msg=lambda m: f"{n}: {m}")
        if proj is not None:
            for l in c["layers"]:
                torch.testing.assert_close(proj[str(l)].weight.grad, ref_proj[l].grad, rtol=1e-3,
                                           atol=1e-7)


def test_opd_chunk_is_opd_bit_for_bit_with_one_tokenizer(ckpts):
    """With one tokenizer every chunk is one token: chunk-level OPD's loss, KL estimate and
    gradients are sampled-token OPD's, to the bit (METHOD.md §4b)."""
    out = {}
    for method in ("opd", "opd_chunk"):
        stu = Transformer.from_pretrained(ckpts["student"])
        tea = Transformer.from_pretrained(ckpts["deep"]).requires_grad_(False)
        plan = make_plan(method, stu.config, tea.config)
        batches = [supervise(collate([Rollout(p, r, "stop") for p, r in part], 0, "cpu"), plan)
                   for part in ([ROLLOUTS[:2], ROLLOUTS[2:]])]
        n_out = sum(b.out_mask.sum().item() for b in batches)
        loss, stats = code_path(plan, batches, stu, tea, n_out, 0, None, None)
        out[method] = loss, stats["kl"], {n: p.grad for n, p in stu.named_parameters()}
    assert out["opd_chunk"][:2] == out["opd"][:2] and out["opd"][0] != 0
    for n, g in out["opd"][2].items():
        assert torch.equal(out["opd_chunk"][2][n], g), n


# ----------------------------------------------------------------------------- the optimizer side

def test_lr_schedule_by_hand(settings_restored, monkeypatch):
    """3% linear warm-up to lr, then a cosine down to min_lr at max_steps: lr_at against the formula
    written out."""
    distill = settings_restored
    for k, v in dict(lr=2e-5, min_lr=2e-6, warmup_frac=0.03, max_steps=500).items():
        monkeypatch.setattr(distill, k, v)
    warmup = 15  # ceil(0.03 * 500)
    for step in (0, 1, 7, 14):
        assert distill.lr_at(step) == pytest.approx(2e-5 * (step + 1) / warmup, rel=1e-12)
    for step in (15, 100, 257, 400, 499):
        t = (step - warmup) / (500 - warmup)
        want = 2e-6 + 0.5 * 18e-6 * (1 + math.cos(math.pi * t))
        assert distill.lr_at(step) == pytest.approx(want, rel=1e-12)
    assert distill.lr_at(15) == pytest.approx(2e-5) and distill.lr_at(500) == pytest.approx(2e-6)
    monkeypatch.setattr(distill, "warmup_frac", 0.0)  # no warm-up: the first step runs at lr
    assert distill.lr_at(0) == pytest.approx(2e-5)


def test_clip_grad_norm_clips_to_max_norm():
    from fsdp import clip_grad_norm
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.ones(2)))
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g)  # the last one has no gradient
    grads = [p.grad.clone() for p in params[:3]]
    norm = math.sqrt(sum((x ** 2).sum().item() for x in grads))
    assert clip_grad_norm(params, 0.5) == pytest.approx(norm, rel=1e-6)  # the norm before the clip
    after = math.sqrt(sum((p.grad ** 2).sum().item() for p in params[:3]))
    assert after == pytest.approx(0.5, rel=1e-5)
    for p, x in zip(params, grads):  # one scale for every gradient: the direction is kept
        torch.testing.assert_close(p.grad, x * (0.5 / norm), rtol=1e-5, atol=0)
    assert clip_grad_norm(params, 10.0) == pytest.approx(0.5, rel=1e-5)  # below max_norm: unchanged
    torch.testing.assert_close(params[0].grad, grads[0] * (0.5 / norm), rtol=1e-5, atol=0)
    clip_grad_norm(params, 0.0)  # 0 turns clipping off
    torch.testing.assert_close(params[0].grad, grads[0] * (0.5 / norm), rtol=1e-5, atol=0)


def test_weight_decay_touches_matrices_only(settings_restored, monkeypatch, ckpts):
    """One AdamW step with zero gradients moves nothing but the decay: every matrix (the projector's
    too) shrinks by lr * weight_decay, the norms' weights (vectors) stay."""
    distill = settings_restored
    monkeypatch.setattr(distill, "weight_decay", 0.1)
    monkeypatch.setattr(distill, "lr", 0.01)
    stu = Transformer.from_pretrained(ckpts["student"])
    proj = torch.nn.ModuleDict({"1": torch.nn.Linear(64, 96, bias=False)})
    opt, params = distill.make_optimizer(stu, proj)
    assert len(params) == len(list(stu.parameters())) + 1
    before = {n: p.detach().clone()
              for n, p in list(stu.named_parameters()) + list(proj.named_parameters())}
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    vectors = 0
    for n, p in list(stu.named_parameters()) + list(proj.named_parameters()):
        want = before[n] * (1 - 0.01 * 0.1) if p.dim() >= 2 else before[n]
        vectors += p.dim() < 2
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=lambda m: f"{n}: {m}")
    assert vectors == 4 * 3 + 1  # per block two RMSNorms and the q/k norms, and the final norm


def test_cpu_optimizer_is_the_per_parameter_loop_bit_for_bit(settings_restored, monkeypatch, ckpts):
    """On a CPU make_optimizer's AdamW runs foreach (fewer calls through DTensor). Five steps of
    random gradients leave every weight exactly where torch's per-parameter AdamW loop
    (foreach=False) puts it, decay included."""
    distill = settings_restored
    monkeypatch.setattr(distill, "weight_decay", 0.1)
    monkeypatch.setattr(distill, "lr", 0.01)
    stu, ref = (Transformer.from_pretrained(ckpts["student"]) for _ in range(2))
    opt = distill.make_optimizer(stu, None)[0]
    groups = [{'params': [p for p in ref.parameters() if p.dim() >= 2], 'weight_decay': 0.1},
              {'params': [p for p in ref.parameters() if p.dim() < 2], 'weight_decay': 0.0}]
    loop = torch.optim.AdamW(groups, lr=0.01, betas=(distill.beta1, distill.beta2), foreach=False)
    assert opt.param_groups[0]['foreach'] and not opt.param_groups[0]['fused']
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(stu.parameters(), ref.parameters()):
            p.grad = q.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
        loop.step()
    for (n, p), q in zip(stu.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(stu.lm_head.weight,
                           Transformer.from_pretrained(ckpts["student"]).lm_head.weight)


# ----------------------------------------------------------------- one whole step of distill.main()

E2E = {  # method settings of one in-process step; the rest is test_distill.base_args
    "oprd": dict(method="oprd"),
    "opd": dict(method="opd"),
    "opd_topk": dict(method="opd_topk", topk=4),
    "opd_full": dict(method="opd_full", activation_checkpointing=True, vocab_chunk_tokens=5),
    "opd+oprd": dict(method="opd+oprd", mu=10.0),
    "opd_topk+oprd": dict(method="opd_topk+oprd", topk=4, oprd_coef=0.5, teacher_fsdp=True),
    # reference solutions, 8 of tiny_train's
    "sft": dict(method="sft", prompts="tiny_few", prompts_per_step=4),
    "projector": dict(method="oprd", projector=True),  # the wide pair: teacher d=128, 4 layers
}


@pytest.mark.parametrize("name", list(E2E))
def test_one_step_of_distill_by_hand(settings_restored, monkeypatch, pair, wide_pair, tmp_path,
                                     name):
    """distill.main() for one step (rollouts of the torch sampler, two micro-batches, warm-up lr,
    clipping, AdamW with weight decay): the logged loss, KL, per-layer losses, lr and grad norm, and
    the saved weights, against the reference on the same rollouts and Adam's first step written
    out: p(1 - lr wd) - lr g/(|g| + eps) (matrices decay; a parameter without a gradient, the LM
    head under OPRD, does not move)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    import data
    from distill_ranks import in_process
    from test_distill import base_args, load_hf, log
    kw = dict(E2E[name])
    monkeypatch.setitem(data.BUILTIN, "tiny_few", lambda: data.tiny_problems("train", 8))
    teacher, student = wide_pair if kw.get("projector") else pair
    out = tmp_path / "out"
    record = in_process(monkeypatch, settings_restored, base_args(
        (teacher, student), out, max_steps=100, stop_step=1, save_every=1, warmup_frac=0.03,
        lr=1e-3, weight_decay=0.5, grad_clip=0.01,
        **dict(dict(prompts_per_step=2, micro_batch_size=3), **kw)))
    rec, seqs = log(out)[0], record["steps"][0]["seqs"]
    assert all(isinstance(v, (int, float)) for v in rec.values())
    assert (rec["mean_response_len"] == sum(len(r) for _, r in seqs) / 4
            and 0 <= rec["trunc_rate"] <= 1)
    assert rec["update_tok_s"] > 0 and rec["update_transient_mem_mb"] >= 0 and rec["sequences"] == 4
    assert (rec.get("rollout_tok_s", 0) > 0) == (kw["method"] != "sft")
    parts = [v for k, v in rec.items() if k.startswith("time/") and k != "time/step"]
    assert len(parts) == 7 and rec["time/step"] == pytest.approx(sum(parts))
    # 2 prompts x 2 samples (sft: 4 x 1), 3 + 1
    assert len(seqs) == 4 and record["steps"][0]["local_micro"] == 2

    c = case("projector" if kw.get("projector") else "oprd")
    c.update(method=kw["method"], mu=kw.get("mu", 1.0), coef=kw.get("oprd_coef", 1.0),
             topk=kw.get("topk", 16))
    if "oprd" not in c["method"]:
        c.update(layers=[], t_layers=[])
    elif not kw.get("projector"):
        c.update(t_layers=[1, 2, 3])  # teacher and student of one depth
    hf_stu = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    hf_tea = (AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
              if c["method"] != "sft" else None)
    proj = ({l: record["proj_start"][str(l)].clone().requires_grad_(True) for l in c["layers"]}
            if kw.get("projector") else None)
    want, kl, layer_sum, _, _, n_out, n_rep = reference(c, seqs, hf_stu, hf_tea, proj)
    want.backward()
    lr0 = 1e-3 / 3  # warm-up over ceil(0.03 * 100) = 3 steps
    assert (rec["loss"] == pytest.approx(want.item(), rel=2e-5)
            and rec["lr"] == pytest.approx(lr0, rel=1e-12))
    if c["method"] not in ("oprd", "sft"):
        assert rec["kl"] == pytest.approx(kl / n_out, rel=1e-4, abs=1e-7)
    for l, s in zip(c["layers"], layer_sum):
        assert rec[f"oprd_loss/{l}"] == pytest.approx(s.item() / n_rep, rel=2e-5)
    grads = {n: p.grad for n, p in hf_stu.named_parameters() if p.grad is not None}
    grads.update({f"projector.{l}": w.grad for l, w in (proj or {}).items()})
    norm = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads.values()))
    assert rec["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0.01  # so the clip acts

    ck = out / "step_0000001"
    after = load_file(str(ck / "model.safetensors"))
    if proj:  # the projector is saved in resume.pt as {'<layer>.weight': W}
        saved = torch.load(ck / "resume.pt", weights_only=True)["projector"]
        after.update({f"projector.{l}": saved[f"{l}.weight"] for l in proj})
    start = dict(hf_stu.named_parameters(),
                 **{f"projector.{l}": w for l, w in (proj or {}).items()})
    assert after.keys() == start.keys()
    scale = 0.01 / (norm + 1e-6)
    for n, p0 in start.items():
        p0, g = p0.detach(), grads.get(n)
        if g is None:
            torch.testing.assert_close(after[n], p0, rtol=0, atol=0,
                                       msg=lambda m: f"{n} has no gradient: {m}")
            continue
        want_p = (p0 * (1 - lr0 * 0.5 if p0.dim() >= 2 else 1)
                  - lr0 * (g * scale) / ((g * scale).abs() + 1e-8))
        # where rounding cannot flip the sign of Adam's g / |g|
        clear = g.abs() > 1e-3 * g.abs().max()
        torch.testing.assert_close(after[n][clear], want_p[clear], rtol=0, atol=2e-7,
                                   msg=lambda m: f"{n}: {m}")
        assert (after[n] - want_p).abs().max() <= 2 * lr0, n
    load_hf(str(ck))  # transformers loads the checkpoint
