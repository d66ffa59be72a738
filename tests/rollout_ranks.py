"""
Helper for tests/test_rollout_vllm.py::test_two_ranks_each_sample_their_share (not a test itself):

$ python -m torch.distributed.run --standalone --nproc_per_node=2 tests/rollout_ranks.py MODEL_A MODEL_B OUT.json

Every rank, as distill.py will: an FSDP2-sharded student (model A's weights) and its own vLLM engine
(external_launcher, in the rank's process); greedy samples for its share of the prompts; then model B's weights
streamed from an FSDP2 model into the engine with update_weights(fsdp_named_tensors(...)); the same share
sampled again. Rank 0 writes what every rank did to OUT.json.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [[5, 6, 7], list(range(3, 160)), [9] * 20, [40, 41, 42, 43, 44, 45], list(range(100, 30, -1))]
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


def main(path_a, path_b, out_path):
    import json
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from rollout import fsdp_named_tensors, make_sampler
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    student = sharded(path_a, mesh)
    sampler = make_sampler("vllm", path_a, device="cpu", dtype="float32", enforce_eager=True)
    share = shard(list(range(len(PROMPTS))), sampler.dp_rank, sampler.dp_size)  # a tensor-parallel group: one share
    prompts = [PROMPTS[i] for i in share]
    before = sampler.generate(prompts, temperature=0, max_new_tokens=MAX_NEW)
    del student
    student = sharded(path_b, mesh)  # stands in for the student after some optimizer steps
    is_dtensor = type(student.model.embed_tokens.weight).__name__ == "DTensor"
    sampler.update_weights(fsdp_named_tensors(student))
    after = sampler.generate(prompts, temperature=0, max_new_tokens=MAX_NEW)
    mine = dict(rank=rank, share=share, in_process=sampler.in_process, dtensor=is_dtensor,
                before=[s[0].tokens for s in before], after=[s[0].tokens for s in after])
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(prompts=PROMPTS, max_new=MAX_NEW, ranks=every), f)
    sampler.close()  # vLLM's teardown destroys the default process group it shares with us
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
