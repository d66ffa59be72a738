# The paper's main setting (METHOD.md §5) on ONE 80 GB GPU: the same 16 sequences per step (8 prompts x 2 samples,
# accumulated one 16k-token sequence at a time), the same optimizer and schedule, vLLM colocated.
# $ python distill.py config/qwen_1gpu.py     (a plain process trains exactly as a one-rank torchrun does)
#
# Peak memory, worked out for DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-1.5B shape, untied head: 1.78 B parameters;
# body 28 x 46.8 M = 1.31 B, embedding and head 2 x 0.233 B) with GB = 2^30 bytes:
#   student fp32 master weights       1.78 B x 4 B =  6.6 GB  (FSDP2 on one rank holds them whole)
#   AdamW state (m and v, fp32)       1.78 B x 8 B = 13.3 GB
#   fp32 gradients (during the update)              6.6 GB  (freed by zero_grad before the next rollout)
#   teacher in bf16                   1.78 B x 2 B =  3.3 GB
#   update activations (activation checkpointing, one 512 + 16,384-token sequence, bf16 block copies): about
#   1.6 GB; lab/bench.py --device=cuda measured Δpeak 8.2 GB for this update, which is the 6.6 GB of gradients plus
#   these activations
#   => trainer about 31 GB during the update, about 23 GB while vLLM samples.
#   vLLM (gpu_memory_utilization 0.3 = 24 GB of 80): its bf16 weights 3.3 GB + KV cache for 16 x 18,432 tokens at
#   28 layers x 2 x 256 x 2 B = 28 KB per token = 7.9 GB, plus its work space. Sleep mode offloads its weights and
#   frees the KV cache during the update, so the two peaks do not add up: about 23 + 24 = 47 GB while sampling,
#   31 GB (+ vLLM's few hundred MB) while updating. On a 40 GB card: no (use two GPUs and torchrun).
exec(open('config/qwen.py').read())  # the paper's setting, then only what differs
out_dir = 'out/qwen_oprd_1gpu'
device = 'cuda'
# unchanged from config/qwen.py, and what makes it fit: prompts_per_step = 8 x n_samples = 2 = 16 sequences on this
# one rank, micro_batch_size = 1 (16 micro-batches accumulated), activation_checkpointing = True,
# gpu_memory_utilization = 0.3
