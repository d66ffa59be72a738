# Sampled-token OPD + mu * OPRD (METHOD.md §2, combined objective; the paper's best: mu = 10).
# $ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd_oprd.py
exec(open('config/qwen.py').read())
out_dir = 'out/qwen_opd_oprd'
method = 'opd+oprd'
mu = 10.0
