# The OPRD paper's main setting (METHOD.md §5), one node of 8 GPUs:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen.py
# Teacher JustRL-DeepSeek-1.5B, student DeepSeek-R1-Distill-Qwen-1.5B (same architecture:
# Qwen2.5-1.5B, 28 layers, d = 1536, untied head, vocab 151936), DAPO-Math-17k prompts, OPRD alone
# on all 28 layers, last 2000 tokens.
# Each model has 1,777,088,000 parameters (lab/measure.py's QWEN_1P5B: 28 blocks x 46,797,824,
# embedding and untied head 2 x 151,936 x 1,536, final norm 1,536); GiB = 2^30 bytes.
out_dir = 'out/qwen_oprd'
student = 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'
teacher = 'hbx/JustRL-DeepSeek-1.5B'
method = 'oprd'
prompts = 'dapo17k'
max_prompt_len = 2048
enable_thinking = False
# rollouts: 8 prompts per step x 2 samples, temperature 1.0, up to 16,384 new tokens
prompts_per_step = 8
n_samples = 2
temperature = 1.0
top_p = 1.0
max_new_tokens = 16384
# vLLM on each GPU, beside the trainer (the teacher, in bf16 1,777,088,000 x 2 B = 3.3 GiB, is
# the trainer's, replicated on every GPU, never vLLM's). vLLM takes its whole budget, 0.3 of an
# 80 GB card, about 24 GiB, and its KV cache gets whatever is left after its weights (the student
# in bf16, 3.3 GiB) and its activations: at most about 24 - 3.3 = 20.7 GiB. At 28 layers x 2 (K, V)
# x 2 KV heads x 128 x 2 B = 28 KiB per token, a GPU's 2 rollouts of at most 2048 + 16,384 =
# 18,432 tokens need 1.0 GiB of it. Asleep during the update it keeps 1-3 GiB (its CUDA-graph pool,
# outside the memory that sleep frees); level-1 sleep pins its weights in host RAM: 3.3 GiB per
# GPU, 8 x 3.3 = 26.5 GiB per node. (Read from vLLM 0.32's sources, not measured.)
gpu_memory_utilization = 0.3
# 2 sequences per GPU a step here, 16 on one GPU (config/qwen_1gpu.py): 64 holds either at once.
# vLLM's own default on an 80 GB H100 is 1024, which captures CUDA graphs for 51 batch sizes up to
# 512; 64 captures 19, up to 128 (vLLM 0.32: engine/arg_utils.py, config/vllm.py).
max_num_seqs = 64
# OPRD: all layers, last k = 2000 response tokens, raw MSE / d, coefficient 1
layers = 'all'
positions = 'last_k'
k_positions = 2000
distance = 'mse'
oprd_coef = 1.0
# 500 steps of AdamW, lr 1e-5, betas 0.9/0.999, wd 0.01, 3% warm-up then cosine, clip 1.0
max_steps = 500
lr = 1e-5
warmup_frac = 0.03
weight_decay = 0.01
grad_clip = 1.0
micro_batch_size = 1          # 16k-token sequences: one per forward; 2 rollouts per rank per step
activation_checkpointing = True
save_every = 100
