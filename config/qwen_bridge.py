# OPRD-Bridge, the paper's cross-architecture setting (METHOD.md §4), one node of 8 GPUs: teacher
# Qwen3-4B (36 layers, d = 2560), student Qwen3-1.7B-Base (28 layers, d = 2048), a frozen rank-8
# bridge per student layer.
# Stage 1: student rollouts of the training prompts, both models frozen; per layer the teacher's
# PCA and a trained P_S, on at most 16,384 response-token rows gathered over all ranks
# -> out/qwen_bridge/bridge:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py --method=bridge_fit
# Stage 2: OPRD through the frozen bridge, all 28 student layers, last 2000 tokens; only the
# student learns:
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py
# Prompts, rollouts, optimizer and schedule are config/qwen.py's.
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_bridge'
student = 'Qwen/Qwen3-1.7B-Base'
teacher = 'Qwen/Qwen3-4B'
method = 'oprd_bridge'
layers = 'all'
positions = 'last_k'
k_positions = 2000
distance = 'normalized_mse'   # of L2-normalised P_S h_S and P_T (h_T - mu_T): 2(1 - cos)/r
bridge_path = 'out/qwen_bridge/bridge'
bridge_rank = 8
bridge_rows = 16384
# P_S: AdamW, weight decay 0, 20 epochs, 10% held out, best held-out cosine kept
bridge_lr = 1e-4
bridge_epochs = 20
bridge_init = 'random'
