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

test: setup host
	$(PY) -m pytest tests

demo: setup
	$(PY) tools/demo.py

# The real host with this pack and a small model to try the nodes on (random weights: it knows no concepts).
COMFY_MODELS := .comfyhost/models/checkpoints
comfy: host
	@mkdir -p $(COMFY_MODELS)
	@test -e $(COMFY_MODELS)/tiny_sd15_random.safetensors || \
		$(PY) tests/host/checkpoints.py --family sd15 --out $(COMFY_MODELS)/tiny_sd15_random.safetensors
	@tools/comfy_host.sh start

comfy-stop:
	@tools/comfy_host.sh stop
