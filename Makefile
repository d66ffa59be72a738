# The two commands of the quick start, on a fresh machine:
#   make tiny    the embedded default: OPRD end to end on the built-in tiny task (tiny.py), from the
#                teacher and student shipped in models/tiny/
#   make test    the test suite
# Each first runs setup.sh once, which makes a project-local .venv; nothing is installed outside this
# folder.
PY := .venv/bin/python

tiny: .venv/ready
	HF_HUB_OFFLINE=1 $(PY) tiny.py

test: .venv/ready
	$(PY) -m pytest -q

.venv/ready: setup.sh requirements.txt
	bash setup.sh
	touch $@

.PHONY: tiny test
