# The paper's main setting (METHOD.md §5) on ONE 80 GB GPU: the same 16 sequences per step
# (8 prompts x 2 samples, accumulated one 16k-token sequence at a time), the same optimizer and
# schedule, vLLM colocated. A plain process trains exactly as a one-rank torchrun does:
# $ python distill.py config/qwen_1gpu.py
#
# Peak memory, worked out for DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-1.5B shape, untied head:
# 1,777,088,000 parameters, 1.78 B; body 28 x 46.8 M = 1.31 B, embedding and head 2 x 0.233 B) with
# GiB = 2^30 bytes:
#   student fp32 master weights       1.78 B x 4 B =  6.6 GiB (FSDP2 on one rank holds them whole)
#   AdamW state (m and v, fp32)       1.78 B x 8 B = 13.2 GiB
#   fp32 gradients (during the update)              6.6 GiB (freed by zero_grad before the next
#                                                            rollout)
#   teacher in bf16 (the same shape)  1.78 B x 2 B =  3.3 GiB
#   update activations (activation checkpointing, one 512 + 16,384-token sequence, bf16 block
#   copies): about 1.6 GiB; lab/bench.py --device=cuda measured Δpeak 8.2 GiB for this update,
#   which is the 6.6 GiB of gradients plus these activations
#   => trainer about 31 GiB during the update, about 23 GiB while vLLM samples.
#   vLLM takes its whole budget (gpu_memory_utilization 0.3 of 80 GB, about 24 GiB): its bf16
#   weights (1.78 B x 2 B = 3.3 GiB), its activations, and a KV cache of whatever is left, at most
#   about 24 - 3.3 = 20.7 GiB. A step's 16 sequences of at most 2048 + 16,384 = 18,432 tokens, at
#   28 layers x 2 (K, V) x 2 KV heads x 128 x 2 B = 28 KiB per token, need 7.9 GiB of it, so all
#   16 run at once (max_num_seqs = 64, from config/qwen.py).
#   Sleep mode offloads its weights and frees the KV cache during the update, so the two peaks do
#   not add up: about 23 + 24 = 47 GiB while sampling, 31 GiB + the 1-3 GiB vLLM keeps asleep (its
#   CUDA-graph pool) = 32-34 GiB while updating; level-1 sleep pins the 3.3 GiB of weights in host
#   RAM. (vLLM's figures read from vLLM 0.32's sources, not measured.) On a 40 GB card: no (use two
#   GPUs and torchrun).
# the paper's setting, then only what differs
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_oprd_1gpu'
device = 'cuda'
# unchanged from config/qwen.py, and what makes it fit: prompts_per_step = 8 x n_samples = 2 = 16
# sequences on this one rank, micro_batch_size = 1 (16 micro-batches accumulated),
# activation_checkpointing = True, gpu_memory_utilization = 0.3, max_num_seqs = 64 (all 16 at once)
