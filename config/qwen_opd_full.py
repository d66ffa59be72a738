# Paper Table 2 baseline on the main setting: opd_full (METHOD.md §3), same rollouts and optimizer
# as config/qwen.py.
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd_full.py
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_opd_full'
method = 'opd_full'
