# OPRD-Bridge across families and tokenizers, one node of 8 GPUs: teacher
# DeepSeek-R1-Distill-Llama-8B (llama: 32 layers, d = 4096, vocabulary 128,256, Llama 3 tokenizer),
# student DeepSeek-R1-Distill-Qwen-1.5B (28 layers, d = 1536, vocabulary 151,936, Qwen tokenizer).
# The teacher reads its own encoding of each rollout (align.py); a frozen rank-4 bridge per student
# layer (bridge_rank 0 = 4 when the tokenizers differ).
# Stage 1 -> out/r1llama_qwen/bridge, then stage 2:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/r1llama_qwen.py --method=bridge_fit
# $ torchrun --standalone --nproc_per_node=8 distill.py config/r1llama_qwen.py
# Memory per 80 GB GPU: the student's fp32 weights, gradients and AdamW state, 16 bytes x 1.8B =
# 28.5 GB, sharded over 8 ranks = 3.6 GB; the teacher replicated in bf16, 2 bytes x 8.0B = 16 GB
# (teacher_fsdp=True shards it too, at the cost of an all-gather per block); vLLM's share
# 0.3 x 80 = 24 GB (asleep during the update); activations of one 16k-token sequence with
# checkpointing: 28 x 16k x 1536 in bf16 = 1.4 GB plus one block's recompute (~1 GB); the teacher's
# kept rows, 28 layers x 2000 x 4096 in bf16 = 0.5 GB. About 47 GB at the peak.
exec(open('config/qwen.py').read())
out_dir = 'out/r1llama_qwen'
teacher = 'deepseek-ai/DeepSeek-R1-Distill-Llama-8B'
method = 'oprd_bridge'
distance = 'normalized_mse'
bridge_path = 'out/r1llama_qwen/bridge'
bridge_rank = 0
