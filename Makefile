# vlaserve: `make help` is the map. Everything runs from the virtualenv this Makefile makes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PRESET ?= tiny
VIEWS ?= 2
DTYPE ?= fp32
VARIANT ?=
REPO ?= model_repository
HOST ?= 127.0.0.1
MPS ?=
ARGS ?=
# the compose stack's own model repository, filled by its export with the image's torch (make up)
COMPOSE_REPO ?= $(CURDIR)/.vlaserve/compose-repository

.DEFAULT_GOAL := help
.PHONY: help venv lerobot-venv test-lerobot aloha-sim export configs serve gateway health infer loadtest compare demo test reliability lint up down compose-test carry carry-lerobot mps-status mps-check clean

help: ## this map of the project
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: PRESET=$(PRESET) VIEWS=$(VIEWS) DTYPE=$(DTYPE) VARIANT=$(VARIANT) REPO=$(REPO) HOST=$(HOST) ARGS=..."

venv: $(STAMP) ## make the virtualenv (.venv) with the pinned requirements

$(STAMP): requirements.txt requirements-serve.txt
	@echo "[venv] creating $(VENV) and installing requirements.txt and requirements-serve.txt (first time: a few minutes) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@# the project's packages (vlaserve, export, loadtest) import from the checkout, also in Triton's stubs
	$(PY) -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "vlaserve.pth").write_text("$(CURDIR)\n")'
	$(PY) deploy/helm/get_helm.py $(VENV)/bin
	@touch $@

$(REPO)/encoder/1/manifest.json:  # the default export; the target's own ARGS are not export's
	$(MAKE) export ARGS=

CHECKPOINT ?=
export: $(STAMP) ## export encoder+decoder to ONNX and TorchScript, check parity, write configs (PRESET VIEWS DTYPE VARIANT; CHECKPOINT=a LeRobot/openpi pi0 folder or .safetensors)
	$(PY) -m export --preset $(PRESET) --views $(VIEWS) --dtype $(DTYPE) --repository $(REPO) $(if $(VARIANT),--variant $(VARIANT)) $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(ARGS)

configs: $(STAMP) ## regenerate every config.pbtxt from $(REPO)/spec.yaml
	$(PY) -m vlaserve.repository --repository $(REPO)

# VARIANT=name: serve that variant of the spec from its own folder, its configs written there and the
# exported artifacts linked (needed for a one_model variant: the exported repository keeps the step models)
SERVED_REPO = $(if $(VARIANT),.vlaserve/variants/$(VARIANT),$(REPO))

serve: $(STAMP) $(REPO)/encoder/1/manifest.json ## start tritonserver (the nvidia-pytriton wheel's) over the repository (VARIANT: a variant of it); MPS=1 starts the MPS sidecar first
	$(if $(VARIANT),rm -rf $(SERVED_REPO) && $(PY) -m vlaserve.repository --repository $(REPO) --variant $(VARIANT) --out $(SERVED_REPO) &&) \
	$(PY) -m vlaserve.server --model-repository $(SERVED_REPO) --host $(HOST) $(if $(MPS),--mps) $(ARGS)

ROBOT ?= droid
gateway: $(STAMP) ## the openpi-compatible WebSocket gateway in front of a running server (ROBOT=droid|aloha, port 8003; HOST=0.0.0.0 for robots on other machines)
	$(PY) -m vlaserve.gateway --robot $(ROBOT) --host $(HOST) $(ARGS)

health: $(STAMP) ## is the running server healthy (ready, and every model instance process alive)? exit 0 or 1
	$(PY) -m vlaserve.health --url http://$(HOST):8000 $(ARGS)

infer: $(STAMP) ## send requests to a running server (ARGS="--requests 8 --concurrency 4 --protocol http")
	$(PY) -m vlaserve.client $(ARGS)

demo: $(STAMP) ## the main job: export tiny, serve, requests, a short load test and a compare, tables
	$(PY) -m demo --repository $(REPO) $(ARGS)

loadtest: $(STAMP) ## Locust sweep against a running server (ARGS="--users 1,4,16 --duration 30")
	$(PY) -m loadtest.sweep --host $(HOST):8000 --metrics-url http://$(HOST):8002/metrics $(ARGS)

compare: $(STAMP) $(REPO)/encoder/1/manifest.json ## the sweep over spec variants, each on its own server, side by side
	$(PY) -m loadtest.sweep --compare naive,batching,batching_multi --repository $(REPO) $(ARGS)

test: $(STAMP) ## run the test suite (starts real tritonservers on free ports)
	$(PY) -m pytest -q tests $(ARGS)

# A virtualenv beside .venv that reads torch, numpy and the project from it (after its own packages), for tools
# whose declared dependencies would replace the project's CPU torch: $(1) its folder, $(2) its requirements.
define layered-venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/python -c 'import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "zz-vlaserve.pth").write_text("import site; site.addsitedir(%r)\n" % "'"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"'")'
	grep -E '^(torch|numpy)==' requirements-serve.txt > $(1)/constraints.txt
	$(1)/bin/python -m pip install --quiet -c $(1)/constraints.txt -r $(2)
endef

# LeRobot's own pi0, the reference of the checkpoint import: LeRobot (without its declared dependencies) and
# the transformers openpi patches
LEROBOT_VENV := .venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed
LEROBOT_PY := $(LEROBOT_VENV)/bin/python
lerobot-venv: $(LEROBOT_STAMP) ## make .venv-lerobot: LeRobot 0.4.4's pi0 beside the project, for make test-lerobot

$(LEROBOT_STAMP): $(STAMP) tests/lerobot/requirements.txt tests/lerobot/requirements-nodeps.txt tests/lerobot/transformers-4.53.2-openpi.patch
	@echo "[lerobot-venv] creating $(LEROBOT_VENV): LeRobot's pi0 and the transformers openpi patches (first time: a minute or two) ..."
	$(call layered-venv,$(LEROBOT_VENV),tests/lerobot/requirements.txt)
	$(LEROBOT_PY) -m pip install --quiet --no-deps -r tests/lerobot/requirements-nodeps.txt
	cd "$$($(LEROBOT_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" && GIT_DIR=/nonexistent git apply --whitespace=nowarn -p1 $(CURDIR)/tests/lerobot/transformers-4.53.2-openpi.patch
	@touch $@

test-lerobot: $(LEROBOT_STAMP) ## the LeRobot equivalence tests: LeRobot's PI0Policy saved, imported, same actions (in .ci/run)
	VLASERVE_LEROBOT_PYTHON=$(CURDIR)/$(LEROBOT_PY) $(PY) -m pytest -q tests/test_lerobot.py $(ARGS)

SIM_VENV := .venv-sim
SIM_STAMP := $(SIM_VENV)/.installed
$(SIM_STAMP): $(STAMP) demo/sim/requirements.txt
	@echo "[sim-venv] creating $(SIM_VENV): gym-aloha and MuJoCo (first time: a minute) ..."
	$(call layered-venv,$(SIM_VENV),demo/sim/requirements.txt)
	@touch $@

aloha-sim: $(SIM_STAMP) ## a simulated ALOHA (gym-aloha) driven through a running gateway (make gateway ROBOT=aloha) at 50 Hz: rate and latency (ARGS="--steps 200 --fast")
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(SIM_VENV)/bin/python -m demo.aloha_sim $(ARGS)

reliability: $(STAMP) $(REPO)/encoder/1/manifest.json ## hostile input, crashes, overload, soak, SIGTERM against a real server: one table (ARGS=--quick)
	$(PY) -m loadtest.reliability --repository $(REPO) $(ARGS)

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

mps-status: $(STAMP) ## every running instance: process, device, MPS percentage, SMs, and its value checks
	$(PY) -m vlaserve.status $(ARGS)

mps-check: $(STAMP) ## on a GPU: which MPS thread percentages give right answers here (ARGS="--percentages 25,50")
	$(PY) -m vlaserve.mps_check --repository $(REPO) $(ARGS)

up: ## docker compose up, the GPU form (MPS sidecar + Triton): builds, exports pi0 inside the image unless done, serves
	mkdir -p $(COMPOSE_REPO)
	VLASERVE_REPOSITORY=$(COMPOSE_REPO) docker compose build
	test -f $(COMPOSE_REPO)/encoder/1/manifest.json || VLASERVE_REPOSITORY=$(COMPOSE_REPO) docker compose run --rm export
	VLASERVE_REPOSITORY=$(COMPOSE_REPO) docker compose up

down: ## docker compose down
	docker compose down

compose-test: $(STAMP) ## the compose stack really run here, CPU form: installs Docker and Compose, builds, serves, checks, cleans up
	$(PY) deploy/cpu/compose_test.py $(ARGS)

carry: $(STAMP) ## build .carry/ for a GPU host without network (packages + trimmed tritonserver the benchmarks/gpu_*.sh runs unpack)
	bash benchmarks/build_carry.sh

carry-lerobot: $(LEROBOT_STAMP) ## build .carry-lerobot/: LeRobot's pi0 for benchmarks/gpu_lerobot_peer.sh on a GPU host without network
	bash benchmarks/build_lerobot_carry.sh

clean: ## remove exported artifacts, logs and reports (keeps the virtualenv)
	rm -rf .vlaserve reports $(REPO)/.staging-*
	find $(REPO) -path '*/1/*' ! -name model.py ! -name .gitkeep -type f -delete
