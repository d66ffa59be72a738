# Paper Table 2 baseline on the main setting: opd (METHOD.md §3), same rollouts and optimizer as
# config/qwen.py.
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd.py
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_opd'
method = 'opd'
