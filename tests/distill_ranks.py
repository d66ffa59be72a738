r"""
Helper for the multi-rank tests (test_scale.py, test_distill.py, test_gpu.py) and test_step.py; not
a test itself. distill.main() with recorders on a few of distill's functions, so a test can see what
each rank held:

$ python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distill_ranks.py \
      RECORD_DIR --key=value ...

Each rank writes RECORD_DIR/rank<r>.pt: per step its rollouts and its own supervised-token counts,
the projector's start and its gradient on this rank before the reduction, the projector at each save
as this rank assembles it, and after a resume the optimizer and projector shards this rank loaded.
In a test's own process, in_process(monkeypatch, distill, args) does the same on the imported
distill module.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def full(t):
    """A DTensor gathered from every rank's shard (a collective), or a plain tensor; a CPU copy."""
    return (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach().cpu().clone()


def local(t):
    """This rank's shard of a DTensor (or the tensor itself); a CPU copy."""
    return (t.to_local() if hasattr(t, 'to_local') else t).detach().cpu().clone()


def install(patch, record):
    """Wrap distill's micro_batches, micro_batch_loss, shard_projector, save_checkpoint and
    load_training_state (patch(distill, name, wrapper): setattr or monkeypatch.setattr); what they
    see goes into record (a dict)."""
    import dataclasses

    import torch
    import distill
    from fsdp import trained_modules
    record.update(steps=[], proj_start=None, proj_grad=[], proj_saved={}, resumed=None)
    real = {k: getattr(distill, k) for k in ('micro_batches', 'micro_batch_loss', 'shard_projector',
                                             'save_checkpoint', 'load_training_state')}

    def micro_batches(seqs, *args):
        batches, counts, n_micro = real['micro_batches'](seqs, *args)
        record['steps'].append(dict(seqs=[(list(r.prompt), list(r.response)) for r in seqs],
                                    n_out=counts.outputs, n_rep=counts.states,
                                    local_out=sum(b.out_mask.sum().item() for b in batches),
                                    local_rep=sum(b.oprd_mask.sum().item() for b in batches),
                                    local_micro=len(batches), n_micro=n_micro, calls=0))
        record['proj_grad'].append(None)
        return batches, counts, n_micro

    def micro_batch_loss(plan, b, hs_s, rows_t, counts, maps):
        out = real['micro_batch_loss'](plan, b, hs_s, rows_t, counts, maps)
        step = record['steps'][-1]
        step['calls'] += 1
        proj = maps.projector
        # this rank's own projector gradient: the same loss through a plain copy
        if proj is not None:
            plain = {k: full(lin.weight).to(b.ids.device).requires_grad_(True)
                     for k, lin in proj.items()}
            copy = torch.nn.ModuleDict({k: torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                                        for k, w in plain.items()})
            for k, w in plain.items():
                copy[k].weight = torch.nn.Parameter(w)
            detached = {layer: h.detach() for layer, h in hs_s.items()}
            copy_maps = dataclasses.replace(maps, projector=copy.to(b.ids.device))
            again, _ = real['micro_batch_loss'](plan, b, detached, rows_t, counts, copy_maps)
            # the zero-weight filler micro-batches come last
            if step['calls'] <= step['local_micro']:
                weights = [copy[k].weight for k in plain]
                grads = dict(zip(plain, torch.autograd.grad(again, weights)))
                acc = record['proj_grad'][-1] or {}
                record['proj_grad'][-1] = {k: acc.get(k, 0) + g.cpu() for k, g in grads.items()}
        return out

    def shard_projector(proj, device, group):
        proj = real['shard_projector'](proj, device, group)
        record['proj_start'] = {k: full(lin.weight) for k, lin in proj.items()}
        return proj

    def save_checkpoint(out_dir, keep, raw_model, model, opt, proj, step, extra, group):
        if proj is not None:
            record['proj_saved'][step] = {k: full(lin.weight) for k, lin in proj.items()}
        return real['save_checkpoint'](out_dir, keep, raw_model, model, opt, proj, step, extra,
                                       group)

    def load_training_state(stu, proj, opt, state):
        real['load_training_state'](stu, proj, opt, state)
        named = trained_modules(stu, proj).named_parameters()
        record['resumed'] = {
            'state': {n: {k: local(v) for k, v in opt.state[p].items()}
                      for n, p in named if p in opt.state},
            'proj': {k: local(lin.weight) for k, lin in proj.items()} if proj is not None else None}

    for name, fn in (('micro_batches', micro_batches), ('micro_batch_loss', micro_batch_loss),
                     ('shard_projector', shard_projector), ('save_checkpoint', save_checkpoint),
                     ('load_training_state', load_training_state)):
        patch(distill, name, fn)
    return record


def in_process(monkeypatch, distill, args):
    """distill.main() in a test's own process with the recorders on; returns the record."""
    record = install(monkeypatch.setattr, {})
    monkeypatch.setattr(sys, 'argv', ['distill.py'] + args)
    distill.main()
    return record


def records(record_dir, world=2):
    """Every rank's record of a run under torchrun."""
    import torch
    return [torch.load(os.path.join(record_dir, f'rank{r}.pt'), weights_only=False)
            for r in range(world)]


def main(record_dir, args):
    import torch
    import distill
    record = install(setattr, {})
    sys.argv = ['distill.py'] + args
    rank = int(os.environ.get('RANK', 0))
    try:
        distill.main()
    finally:
        os.makedirs(record_dir, exist_ok=True)
        torch.save(record, os.path.join(record_dir, f'rank{rank}.pt'))


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2:])
