"""
OPRD-Bridge (METHOD.md §4): a teacher of another width and depth, seen through a frozen
rank-r bridge.

Stage 1 (distill.py method=bridge_fit collects the rows; fit_bridge here fits them), both models
frozen: at each aligned layer, the teacher's top-r principal directions P_T (with mean mu_T) of its
hidden states on the student's rollouts, and a linear P_S (r x d_S) trained toward P_T (h_T - mu_T).
Stage 2 (method=oprd_bridge) is the OPRD loss between P_S h_S and P_T (h_T - mu_T), the bridge
frozen, only the student learning. The same least squares also gives distill.py's learned projector
(projector=True) its start under projector_init='lstsq'.

    # rows: {layer: (student rows, teacher rows)}
    bridge, fit = fit_bridge(rows, s_layers, r=8, ...)
    save_bridge('bridge/', bridge, meta)
    bridge, meta = load_bridge('bridge/')
"""
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fsdp import all_reduce_max, all_reduce_sum, is_dist


class BridgeError(ValueError):
    """A bridge that cannot serve this run (missing, corrupt, fit for other models or layers,
    rank too high)."""


def pca(rows):
    """Principal directions of rows (N, d), in fp64: the mean (d,) and all min(N, d) directions
    (k, d), orthonormal, by decreasing variance. Each direction's largest-magnitude entry is made
    positive, so the result is unique."""
    x = rows.double()
    mean = x.mean(0)
    vh = torch.linalg.svd(x - mean, full_matrices=False).Vh
    return mean, vh * vh.gather(1, vh.abs().argmax(1, keepdim=True)).sign()


def mean_cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def fit_projector(x, y, x_val, y_val, lr=1e-4, epochs=20, batch_size=256, seed=0, init=None):
    """P_S (r, d_S), no bias, trained by AdamW (weight decay 0) on the mean of ||P_S x - y||^2 over
    shuffled mini-batches of (x (N, d_S), y (N, r)), from `init` or nn.Linear's uniform init.
    Returns the weights of the epoch with the best held-out cosine (the initial weights included)
    and that cosine."""
    g = torch.Generator().manual_seed(seed)
    d_s = x.shape[1]
    if init is None:
        w = (torch.rand(y.shape[1], d_s, generator=g) * 2 - 1) / math.sqrt(d_s)
    else:
        w = init.float().cpu()
    w = w.to(x.device).requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    best, best_cos = w.detach().clone(), mean_cos(x_val @ w.detach().T, y_val)
    for _ in range(epochs):
        for i in torch.randperm(len(x), generator=g).to(x.device).split(batch_size):
            loss = (x[i] @ w.T - y[i]).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        c = mean_cos(x_val @ w.detach().T, y_val)
        if c > best_cos:
            best, best_cos = w.detach().clone(), c
    return best, best_cos


def solve_map(gram, cross):
    """The least-squares map W from the normal equations (x^T x) W = x^T y, in fp64, with a ridge of
    1e-6 x the mean eigenvalue of x^T x."""
    gram = gram.double().clone()
    gram.diagonal().add_(1e-6 * gram.diagonal().mean() + 1e-12)
    return torch.linalg.solve(gram, cross.double())


def lstsq_map(x, yc):
    """The least-squares linear map W (d_S, d_T) from student rows x (N, d_S) to centred teacher
    rows yc (N, d_T). The best rank-r P_S is P_T W^T."""
    x, yc = x.double(), yc.double()
    return solve_map(x.T @ x, x.T @ yc)


def teacher_rows(tea, b, m, taps):
    """The teacher's taps at the rows the student's mask m picks: its own reading of the rollouts
    when its tokenizer differs (b.teacher, from batch.micro_batch), else the student's ids at m."""
    if b.teacher is not None:
        return tea(b.teacher.ids, attention_mask=b.teacher.attention_mask, taps=taps,
                   rows=b.teacher.keep)
    return tea(b.ids, attention_mask=b.attention_mask, taps=taps, rows=m)


@torch.no_grad()
def init_projector(proj, stu, tea, batches, plan, group):
    """The learned projector's start under projector_init='lstsq' (distill.py): per aligned layer,
    the least-squares map from the student's states to the teacher's on one step of the student's
    rollouts (batches: (batch, mask) pairs), the normal equations summed over group's ranks (the
    trainers) so every rank starts alike. From nn.Linear's random start the projection is noise,
    and the first updates bend the student toward that noise before the projector has learned
    anything; from this start the gradient into the student is only what no linear map
    explains."""
    # per layer: x^T x (d_S, d_S) and x^T y (d_S, d_T) in fp64, over this rank's rows
    sums = {}
    for ls in plan.s_layers:
        d_t, d_s = proj[str(ls)].weight.shape
        dev = proj[str(ls)].weight.device
        sums[ls] = [torch.zeros(d_s, d_s, dtype=torch.float64, device=dev),
                    torch.zeros(d_s, d_t, dtype=torch.float64, device=dev)]
    for b, m in batches:
        hs_t = teacher_rows(tea, b, m, plan.t_taps)
        hs_s = stu(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
        for ls, lt in zip(plan.s_layers, plan.t_layers):
            x, y = hs_s[ls][m].double(), hs_t[lt].double()
            sums[ls][0] += x.T @ x
            sums[ls][1] += x.T @ y
    for ls, (gram, cross) in sums.items():
        w = proj[str(ls)].weight
        w.copy_(solve_map(all_reduce_sum(gram, group), all_reduce_sum(cross, group)).T.to(w))


def sweep_ranks(k):
    """The ranks of the cosine-by-rank table: 1, 4, 8, 16, ... below k, then k (full rank)."""
    return [1] + [2 ** i for i in range(2, 30) if 2 ** i < k] + [k] if k > 1 else [1]


def cos_by_rank(x_val, yc_val, w, components, ranks):
    """Held-out cosine of the bridge at each rank with the least-squares P_S (w from lstsq_map): one
    map serves every rank, the coordinates in the PCA basis (components (k, d_T)) truncated to the
    first r. (At r = 1 the cosine is +-1 per row: the rate of sign agreement.)"""
    pred, target = x_val.double() @ w @ components.T, yc_val.double() @ components.T  # (n_val, k)
    return {r: mean_cos(pred[:, :r], target[:, :r]) for r in ranks}


def fit_bridge_layer(h_s, h_t, rank, max_rows=16384, holdout=0.1, seed=0, init='random', **train):
    """Stage 1 for one layer pair: h_s (N, d_S), h_t (N, d_T) rows at the same positions. At most
    max_rows rows (a seeded random subset); a fraction `holdout` of them is held out, the PCA and
    P_S are fit on the rest. P_S starts from nn.Linear's init ('random', the paper) or the
    least-squares solution ('lstsq'). Returns mu_T (d_T,), P_T (rank, d_T), P_S (rank, d_S), P_S's
    held-out cosine, and {r: held-out cosine} of the least-squares P_S at the ranks of sweep_ranks
    and at `rank`."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(h_s), generator=generator)[:max_rows].to(h_s.device)
    n_val = max(1, round(holdout * len(perm)))
    val, tr = perm[:n_val], perm[n_val:]
    mean, comps = pca(h_t[tr])
    if rank > comps.shape[0]:
        raise BridgeError(f"bridge_rank={rank} but the PCA has only {comps.shape[0]} directions "
                          f"({len(tr)} training rows, teacher width {h_t.shape[1]}): "
                          "collect more rows")
    yc = h_t[tr].double() - mean
    yc_val = h_t[val].double() - mean
    w = lstsq_map(h_s[tr], yc)
    p_t = comps[:rank]
    p_s, cos = fit_projector(h_s[tr].float(), (yc @ p_t.T).float(),
                             h_s[val].float(), (yc_val @ p_t.T).float(),
                             seed=seed, init=p_t @ w.T if init == 'lstsq' else None, **train)
    ranks = sorted(set(sweep_ranks(comps.shape[0])) | {rank})
    return mean.float(), p_t.float(), p_s, cos, cos_by_rank(h_s[val], yc_val, w, comps, ranks)


class PCAProjection(nn.Module):
    """The teacher side of the bridge: h_T (..., d_T) -> P_T (h_T - mu_T) (..., r)."""

    def __init__(self, mean, components):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('components', components)

    def forward(self, h):
        return (h - self.mean) @ self.components.T


class Bridge(nn.Module):
    """The frozen OPRD-Bridge, keyed by student layer: student[l](h_S) = P_S h_S and
    teacher[l](h_T) = P_T (h_T - mu_T), both in R^r. fits: {layer: (mu_T, P_T, P_S)}. Nothing in it
    learns in stage 2."""

    def __init__(self, fits):
        super().__init__()
        self.student, self.teacher = nn.ModuleDict(), nn.ModuleDict()
        for l, (mean, p_t, p_s) in fits.items():
            self.student[str(l)] = nn.Linear(p_s.shape[1], p_s.shape[0], bias=False)
            self.student[str(l)].weight = nn.Parameter(p_s.float(), requires_grad=False)
            self.teacher[str(l)] = PCAProjection(mean.float(), p_t.float())


def arch(cfg):
    """What a bridge must match in a model: its architecture, width, depth and vocabulary."""
    keys = ('model_type', 'hidden_size', 'num_hidden_layers', 'vocab_size')
    return {k: getattr(cfg, k) for k in keys}


def save_bridge(path, bridge, meta):
    """path/bridge.safetensors (student.<l>.weight = P_S, teacher.<l>.mean = mu_T,
    teacher.<l>.components = P_T) + path/bridge.json (meta: rank, layers, both models' arch, the
    fit's settings and cosines). Written beside the target and renamed into place."""
    from safetensors.torch import save_file
    partial = path.rstrip('/') + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file({k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()},
              os.path.join(partial, 'bridge.safetensors'))
    with open(os.path.join(partial, 'bridge.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def load_bridge(path):
    """(Bridge, meta) from a folder written by save_bridge; one-line BridgeErrors for a missing
    or broken one."""
    from safetensors.torch import load_file
    files = [os.path.join(path, n) for n in ('bridge.safetensors', 'bridge.json')]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise BridgeError(f"no bridge file {missing[0]!r}: "
                          "fit the bridge first with method=bridge_fit")
    try:
        with open(files[1]) as f:
            meta = json.load(f)
        sd = load_file(files[0])
        bridge = Bridge({l: (sd[f'teacher.{l}.mean'], sd[f'teacher.{l}.components'],
                             sd[f'student.{l}.weight'])
                         for l in meta['student_layers']})
    except Exception as e:  # a missing key or tensor, bad JSON, a truncated safetensors file
        raise BridgeError(f"corrupt bridge in {path!r}: {type(e).__name__} {e}") from None
    return bridge, meta


def check_bridge(meta, path, plan, stu_cfg, tea_cfg):
    """The bridge must have been fit for these two models and cover every aligned layer with
    the same phi."""
    for side, cfg in (('student', stu_cfg), ('teacher', tea_cfg)):
        if meta.get(side) != arch(cfg):
            raise BridgeError(f"bridge {path!r} was fit for the {side} {meta.get(side)}, "
                              f"not this run's {side} {arch(cfg)}: refit it with method=bridge_fit")
    fit = dict(zip(meta['student_layers'], meta['teacher_layers']))
    bad = [(ls, lt) for ls, lt in zip(plan.s_layers, plan.t_layers) if fit.get(ls) != lt]
    if bad:
        raise BridgeError(f"bridge {path!r} was fit for layers {meta['student_layers']} "
                          f"-> teacher {meta['teacher_layers']}; "
                          f"it has no map for {bad} (student -> teacher): "
                          "refit it with method=bridge_fit, or choose layers it covers")


def gather_rows(x, device):
    """All ranks' rows (n_rank, d), concatenated in rank order, on every rank; a copy
    in one process."""
    if not is_dist():
        return x.to(device)
    x = x.to(device)
    n = torch.tensor([len(x)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros(n_max - len(x), x.shape[1])])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


def fit_bridge(rows, s_layers, r, device, max_rows=16384, seed=0, **fit_kw):
    """Stage 1's fit, every layer: rows {student layer: (h_S rows, h_T rows)} of this rank
    (CPU). Every rank's rows are gathered; layer j is fit by rank j % world and broadcast, so
    the bridge is the same on every rank (checked by a checksum). Returns the Bridge and
    {'heldout_cos', 'cos_by_rank', 'cos_by_rank_mean'}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_dist() else (0, 1)
    fits = {}
    for j, l in enumerate(s_layers):
        h_s, h_t = (gather_rows(torch.cat(x), device) for x in rows.pop(l))
        if j % world == rank:
            fits[l] = (h_s, h_t)
    for l, (h_s, h_t) in fits.items():
        out = fit_bridge_layer(h_s, h_t, r, max_rows, seed=seed + l, **fit_kw)
        fits[l] = [t.cpu() if torch.is_tensor(t) else t for t in out]
    if is_dist():
        for j, l in enumerate(s_layers):  # the owner's fit to every rank (pickled CPU tensors)
            obj = [fits.get(l)]
            dist.broadcast_object_list(obj, src=j % world)
            fits[l] = obj[0]
    bridge = Bridge({l: fits[l][:3] for l in s_layers})
    tensors = bridge.state_dict().values()
    checksum = sum(t.double().sum().item() + t.double().abs().sum().item() for t in tensors)
    # max == min over ranks (stage 1 runs on every rank of the world)
    world_group = dist.group.WORLD
    if all_reduce_max(checksum, world_group) != -all_reduce_max(-checksum, world_group):
        raise RuntimeError("the bridge differs between ranks")
    by_rank = {str(l): {str(k): c for k, c in fits[l][4].items()} for l in s_layers}
    ranks = list(fits[s_layers[0]][4])
    by_rank_mean = {str(k): sum(by_rank[str(l)][str(k)] for l in s_layers) / len(s_layers)
                    for k in ranks}
    return bridge, {'heldout_cos': {str(l): fits[l][3] for l in s_layers}, 'cos_by_rank': by_rank,
                    'cos_by_rank_mean': by_rank_mean}


def print_fit(fit, s_layers, t_layers, r):
    """Each layer's held-out cosine, and the cosine-by-rank table of the least-squares P_S."""
    for ls, lt in zip(s_layers, t_layers):
        print(f"layer {ls} -> teacher {lt}: held-out cosine {fit['heldout_cos'][str(ls)]:.4f} "
              f"at rank {r} (least squares: {fit['cos_by_rank'][str(ls)][str(r)]:.4f})")
    ranks = list(fit['cos_by_rank_mean'])
    print(f"held-out cosine by rank (least-squares P_S, mean over {len(s_layers)} layers; "
          f"full rank = {ranks[-1]}):")
    print('  rank ' + ' '.join(f'{k:>7}' for k in ranks))
    print('  cos  ' + ' '.join(f"{fit['cos_by_rank_mean'][k]:7.4f}" for k in ranks))


def collect_rows(stu, tea, steps, plan, max_rows):
    """Stage 1's rows: hidden states of both frozen models at the supervised positions of the
    student's rollouts (steps: lists of (batch, mask) per rollout step), until max_rows rows per
    layer over all ranks."""
    # student layer -> (student rows, teacher rows), on the CPU
    rows = {l: ([], []) for l in plan.s_layers}
    n_rows = 0
    n_steps = 0
    for batches in steps:
        n_local = 0
        for b, m in batches:
            with torch.no_grad():
                hs_t = teacher_rows(tea, b, m, plan.t_taps)
                hs_s = stu(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
            for ls, lt in zip(plan.s_layers, plan.t_layers):
                rows[ls][0].append(hs_s[ls][m].float().cpu())
                rows[ls][1].append(hs_t[lt].float().cpu())
            n_local += m.sum().item()
        n_rows += all_reduce_sum(n_local, dist.group.WORLD).item()
        n_steps += 1
        if n_rows >= max_rows:  # the same decision on every rank: n_rows is all-reduced
            break
    return rows, int(n_rows), n_steps


def fit_stage1(stu, tea, steps, plan, cfg, paths, device):
    """OPRD-Bridge stage 1 (METHOD.md §4), driven by distill.py method=bridge_fit: rows, the
    per-layer fit, the report, and bridge_path written by rank 0. cfg: distill.py's settings.
    Returns (bridge, meta)."""
    r = cfg['bridge_rank']
    t0 = time.time()
    rank = dist.get_rank() if is_dist() else 0
    rows, n_rows, n_steps = collect_rows(stu, tea, steps, plan, cfg['bridge_rows'])
    if n_rows < 2 * r + 10:
        raise BridgeError(f"stage 1 collected only {n_rows} rows per layer: too few for a "
                          f"rank-{r} bridge (more prompts, samples or max_new_tokens)")
    if rank == 0:
        print(f"stage 1: {n_rows} rows per layer from {n_steps} rollout steps "
              f"in {time.time() - t0:.1f} s; fitting {len(plan.s_layers)} layers at rank {r}")
    t1 = time.time()
    settings = dict(init=cfg['bridge_init'], lr=cfg['bridge_lr'], epochs=cfg['bridge_epochs'],
                    batch_size=cfg['bridge_batch_size'])
    bridge, fit = fit_bridge(rows, plan.s_layers, r, device, cfg['bridge_rows'], seed=cfg['seed'],
                             **settings)
    meta = {'rank': r, 'student_layers': plan.s_layers, 'teacher_layers': plan.t_layers,
            'student': arch(stu.config), 'teacher': arch(tea.config),
            'student_path': paths[0], 'teacher_path': paths[1],
            'rows_collected': n_rows, 'rows': min(n_rows, cfg['bridge_rows']), 'holdout': 0.1,
            **{k: cfg[k] for k in ('positions', 'k_positions', 'align', 'seed')}, **settings, **fit}
    if rank == 0:
        world = dist.get_world_size() if is_dist() else 1
        print(f"bridge identical on {world} rank(s); fit in {time.time() - t1:.1f} s")
        print_fit(fit, plan.s_layers, plan.t_layers, r)
        save_bridge(cfg['bridge_path'], bridge, meta)
        print(f"saved {cfg['bridge_path']}")
    if is_dist():
        dist.barrier()
    return bridge, meta
