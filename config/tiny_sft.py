# Supervised training on the tiny task's worked solutions: how tiny.py makes the teacher and the
# student (checkpoints of one run, at the steps tiny.py's student_step and teacher_step name: 500
# and 1000; the paper's pair is likewise one architecture, the teacher further along). Every 100th
# checkpoint is kept, so that `python tiny.py --tune=True` can compare them on the validation split.
# $ python distill.py config/tiny_sft.py --student=tiny/init_pair
out_dir = 'tiny/sft'
method = 'sft'
prompts = 'tiny_train'
max_prompt_len = 64
prompts_per_step = 64
micro_batch_size = 64
max_steps = 1000
lr = 3e-3
min_lr = 3e-4
warmup_frac = 0.03
weight_decay = 0.0
save_every = 100
keep_checkpoints = 10
