# Paper Table 2 baseline on the main setting: opd_topk (METHOD.md §3), same rollouts and optimizer
# as config/qwen.py.
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd_topk.py
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_opd_topk'
method = 'opd_topk'
topk = 16
