# The two commands of the README: `make demo` and `make test`. Both install what they need on a fresh machine.
PY := .venv/bin/python
# One torch thread: on 2 shared cores more threads make every op many times slower.
export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: setup host browser webui-hosts test demo comfy comfy-stop

setup:
	@tools/setup_venv.sh

host: setup
	@tools/comfy_host.sh install

# Debian's chromium for the browser tests (Playwright comes with the venv)
browser:
	@tools/setup_browser.sh

# Venvs for the A1111 / Forge hosts found through A1111_ROOT / FORGE_ROOT (the tests say which did not run and why).
webui-hosts: setup
	@tools/webui_host.sh install

test: setup host browser webui-hosts
	$(PY) -m pytest tests

demo: setup
	$(PY) -m esd_bench.demo

# The real host with this pack and the toy model (esd_bench) embedded in SD1.5 shapes, to try the nodes on.
COMFY_MODELS := .comfyhost/models/checkpoints
comfy: host
	@mkdir -p $(COMFY_MODELS)
	@test -e $(COMFY_MODELS)/esd_toy_sd15.safetensors || \
		$(PY) -m esd_bench.comfy_toy --out $(COMFY_MODELS)/esd_toy_sd15.safetensors
	@tools/comfy_host.sh start

comfy-stop:
	@tools/comfy_host.sh stop
