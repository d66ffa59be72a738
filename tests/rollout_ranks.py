"""
Helper for tests/test_rollout_vllm.py::test_two_ranks_each_sample_their_share (not a test itself):

$ python -m torch.distributed.run --standalone --nproc_per_node=2 tests/rollout_ranks.py A B OUT

Every rank, as distill.py will: an FSDP2-sharded student (checkpoint folder A's weights) and its
own vLLM engine (external_launcher, in the rank's process); greedy samples for its share of the
prompts; then checkpoint B's weights streamed from an FSDP2 model into the engine with
update_weights(fsdp_named_tensors(...)); the same share sampled again; then every prompt on rank 0
while rank 1 draws nothing (distill.py's idle rank, which has no prompt in a step). Then the
weights that a bf16 engine would receive from the sharded model. Rank 0 writes what every rank did
to OUT (a .json file).

The engines' KV cache is sized by rollout.py's defaults unless VLLM_CPU_KVCACHE_SPACE is set: the
test removes it, so that the two engines' memory on one node is what is checked.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = [[5, 6, 7], list(range(3, 160)), [9] * 20, [40, 41, 42, 43, 44, 45],
           list(range(100, 30, -1))]
MAX_NEW = 8


def shard(items, rank, world):
    """This rank's contiguous share of items (sizes differ by at most one)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def sharded(path, mesh):
    from torch.distributed.fsdp import fully_shard
    from model import Transformer
    model = Transformer.from_pretrained(path)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def bf16_sync(student, path):
    """What fsdp_named_tensors(student, dtype=bf16) hands an engine, against an independent bf16
    cast of the unsharded checkpoint: (every tensor equal, the dtypes its all-gathers moved)."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor
    from rollout import fsdp_named_tensors
    gathered = set()
    full_tensor = DTensor.full_tensor

    # records the dtype of each all-gather: the cast must come before it
    def recording(self, *args, **kw):
        gathered.add(str(self.dtype))
        return full_tensor(self, *args, **kw)
    DTensor.full_tensor = recording
    try:
        got = dict(fsdp_named_tensors(student, dtype=torch.bfloat16))
    finally:
        DTensor.full_tensor = full_tensor
    stored = load_file(os.path.join(path, "model.safetensors"))
    want = {name: t.to(torch.bfloat16) for name, t in stored.items()}
    equal = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return equal, sorted(gathered)


def main(path_a, path_b, out_path):
    import json
    import psutil
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from rollout import fsdp_named_tensors, make_sampler
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    student = sharded(path_a, mesh)
    sampler = make_sampler("vllm", path_a, device="cpu", dtype="float32", enforce_eager=True)
    cache = sampler.llm.llm_engine.vllm_config.cache_config
    # a tensor-parallel group: one share
    share = shard(list(range(len(PROMPTS))), sampler.dp_rank, sampler.dp_size)
    prompts = [PROMPTS[i] for i in share]
    before = sampler.generate(prompts, temperature=0, max_new_tokens=MAX_NEW)
    del student
    # stands in for the student after some optimizer steps
    student = sharded(path_b, mesh)
    is_dtensor = type(student.model.embed_tokens.weight).__name__ == "DTensor"
    sampler.update_weights(fsdp_named_tensors(student, dtype=sampler.dtype))
    after = sampler.generate(prompts, temperature=0, max_new_tokens=MAX_NEW)
    # one engine draws while the other does not (it only sleeps, as shares.rollouts does)
    alone = []
    if rank == 0:
        alone = sampler.generate(PROMPTS, temperature=0, max_new_tokens=MAX_NEW)
    sampler.sleep()
    bf16_equal, gathered = bf16_sync(student, path_b)
    mine = dict(rank=rank, share=share, in_process=sampler.in_process, dtensor=is_dtensor,
                before=[s[0].tokens for s in before], after=[s[0].tokens for s in after],
                alone=[s[0].tokens for s in alone],
                bf16_equal=bf16_equal, gathered_dtypes=gathered,
                memory_share=cache.gpu_memory_utilization,
                kv_cache_memory_bytes=cache.kv_cache_memory_bytes,
                rss=psutil.Process().memory_info().rss, ram=psutil.virtual_memory().total)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(prompts=PROMPTS, max_new=MAX_NEW, ranks=every), f)
    # vLLM's teardown destroys the default process group it shares with us
    sampler.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
