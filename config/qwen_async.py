# The paper's main setting (config/qwen.py) on one node of 8 x 80 GB GPUs as 6 trainer ranks and 2
# sampler ranks, one step behind: the samplers draw step t+1's 16 rollouts while the trainers
# train step t on the rollouts of the weights one update old (ranks.py; RESULTS.md works out what
# it buys on this job).
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_async.py
# Each model has 1,777,088,000 parameters; GiB = 2^30 bytes.
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_oprd_async'
# ranks 6 and 7 only sample; 0-5 train under FSDP2 over their own group
rollout_ranks = 2
# step t trains on rollouts of the weights after t - 1 updates (the default with sampler ranks)
off_policy_steps = 1
# A trainer GPU holds its sixth of the fp32 student (6.62 GiB / 6 = 1.10 GiB), of its fp32
# gradients (1.10 GiB) and of AdamW's two moments (2.21 GiB), the bf16 teacher whole (3.31 GiB),
# and the update's activations: measured on one H200 at the paper's shape, 8.2 GB above the start
# for one 16.9k-token sequence including 6.6 GB of unsharded fp32 gradients, so about 1.6 GB. The
# weight sync gathers one bf16 tensor at a time (the largest, the embedding, 0.43 GiB). About
# 10 GiB of 80: no sleep mode, no offload.
#
# A sampler GPU holds one vLLM engine and nothing of the trainer's, awake all run: its share below
# is of the whole card. Its weights are the bf16 student (3.31 GiB); its KV cache, at 28 KiB per
# token (28 layers x K, V x 2 KV heads x 128 x 2 B), needs 8 rollouts x (2,048 + 16,384) tokens x
# 28 KiB = 3.9 GiB for its half of a step, far below the 0.85 x 80 GB = 63 GiB budget minus the
# weights. The rest of the card is the sampler process's own CUDA context and one 256 MiB bucket
# of the incoming weights, which reach the engine's worker (a process of its own) through host
# memory.
gpu_memory_utilization = 0.85
