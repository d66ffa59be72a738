# OPRD-Bridge across tokenizers, the OPRD authors' setting (METHOD.md §4b), one node of 8 GPUs:
# teacher Phi-4-mini-reasoning (phi3: 32 layers, d = 3072, vocabulary 200,064), student
# Qwen3-1.7B-Base (28 layers, d = 2048, vocabulary 151,936). The teacher reads its own encoding of
# each rollout (align.py); states are compared at the ends of the chunks of text both have read; a
# frozen rank-4 bridge per student layer (bridge_rank 0 = 4 here).
# Stage 1 (both frozen; at most 16,384 aligned rows per layer over all ranks)
# -> out/phi4_qwen3/bridge:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/phi4_qwen3.py --method=bridge_fit
# Stage 2 (only the student learns):
# $ torchrun --standalone --nproc_per_node=8 distill.py config/phi4_qwen3.py
# Memory per 80 GB GPU: the student's fp32 weights, gradients and AdamW state, 16 bytes x 2.0B =
# 32 GB, sharded over 8 ranks = 4 GB; the teacher replicated in bf16, 2 bytes x 3.8B = 7.7 GB;
# vLLM's share 0.3 x 80 = 24 GB (asleep during the update); activations of one 16k-token sequence
# with checkpointing: 28 block inputs of 16k x 2048 in bf16 = 1.9 GB plus one block's recompute
# (~1 GB); the teacher's kept rows, 28 layers x 2000 x 3072 in bf16 = 0.3 GB. About 40 GB at the
# peak.
exec(open('config/qwen.py').read())
out_dir = 'out/phi4_qwen3'
student = 'Qwen/Qwen3-1.7B-Base'
teacher = 'microsoft/Phi-4-mini-reasoning'
method = 'oprd_bridge'
distance = 'normalized_mse'   # of L2-normalised P_S h_S and P_T (h_T - mu_T): 2(1 - cos)/r
bridge_path = 'out/phi4_qwen3/bridge'
bridge_rank = 0               # 4 across tokenizers (the authors' setting)
