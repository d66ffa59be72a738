# The OPRD paper's main setting (METHOD.md §5), one node of 8 GPUs:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen.py
# Teacher JustRL-DeepSeek-1.5B, student DeepSeek-R1-Distill-Qwen-1.5B (same architecture: Qwen2.5-1.5B, 28 layers,
# d = 1536, untied head, vocab 151936), DAPO-Math-17k prompts, OPRD alone on all 28 layers, last 2000 tokens.
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
gpu_memory_utilization = 0.3
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
