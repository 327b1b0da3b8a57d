# The two commands of the README: `make demo` and `make test`. Both install what they need on a fresh machine.
PY := .venv/bin/python
# One torch thread: on 2 shared cores more threads make every op many times slower.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: setup host test demo comfy comfy-stop

setup:
	@tools/setup_venv.sh

host: setup
	@tools/comfy_host.sh install

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/demo.py

comfy: host
	@tools/comfy_host.sh start

comfy-stop:
	@tools/comfy_host.sh stop
