# OPRD on the built-in tiny task, on a CPU (tiny.py makes the teacher and the student first):
# $ python distill.py config/tiny.py
# A Qwen3-architecture pair of the same shape (4 layers, d = 128, byte-level tokenizer); the teacher
# is the same SFT run trained twice as long. Rollouts through vLLM's CPU build where it is
# installed. The learning rate and the step count were chosen on the validation split
# (python tiny.py --tune=True).
out_dir = 'tiny/oprd'
student = 'tiny/student'
teacher = 'tiny/teacher'
method = 'oprd'
prompts = 'tiny_train'
max_prompt_len = 64
backend = 'auto'
prompts_per_step = 32
n_samples = 2
temperature = 1.0
max_new_tokens = 64
layers = 'all'
positions = 'all'
distance = 'mse'
oprd_coef = 1.0
topk = 16
max_steps = 60
micro_batch_size = 64
lr = 2e-3
warmup_frac = 0.05
weight_decay = 0.0
save_every = 1000
keep_checkpoints = 1
