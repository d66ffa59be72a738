# The two commands of the quick start, on a fresh machine:
#   make tiny    the embedded default: OPRD end to end on the built-in tiny task (tiny.py), from the
#                teacher and student shipped in models/tiny/
#   make test    the test suite
# Each first runs setup.sh once, which makes a project-local .venv; nothing is installed outside this
# folder.
# On a GPU node, after `python3 -m venv .venv && .venv/bin/pip install -r requirements-gpu.txt`:
#   make gpu     the first-run check (lab/gpu_check.py): the weight sync, CUDA graphs, distill.py
#                and eval.py on one rank and on two, for each sampler backend
PY := .venv/bin/python

tiny: .venv/ready
	HF_HUB_OFFLINE=1 $(PY) tiny.py

test: .venv/ready
	$(PY) -m pytest -q

# not through setup.sh, which makes the CPU environment
gpu:
	@test -x $(PY) || { echo "error: no $(PY): make it with requirements-gpu.txt"; exit 1; }
	HF_HUB_OFFLINE=1 $(PY) -m lab.gpu_check

.venv/ready: setup.sh requirements.txt
	bash setup.sh
	touch $@

.PHONY: tiny test gpu
