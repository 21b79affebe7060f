# `make test` and `make bench` set everything up from nothing: a virtual environment with
# torch and the test/bench dependencies, then fastloss built against that torch.
# With an interpreter that already has torch (e.g. offline on a GPU machine), use
# `make test PYTHON=python3`: no environment is created and nothing is downloaded.

TORCH_VERSION ?= 2.13.0
VENV ?= .venv
PYTHON ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

ifeq ($(PYTHON),)
PY := $(abspath $(VENV))/bin/python
SETUP := $(VENV)/.installed
else
# An interpreter given by a relative path still works from tests/.
PY := $(if $(findstring /,$(PYTHON)),$(abspath $(PYTHON)),$(PYTHON))
SETUP := .python-ready
endif

.PHONY: test bench install info gpu-check wheelhouse clean

# The stamp names the torch version: another TORCH_VERSION reinstalls torch in the environment.
$(VENV)/.installed: $(VENV)/.installed-torch-$(TORCH_VERSION)
	touch $@

$(VENV)/.installed-torch-$(TORCH_VERSION): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)"
	$(VENV)/bin/python -m pip install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja numpy \
		pytest expecttest mypy tqdm matplotlib mpmath scipy transformers pot geomloss
	touch $@

.python-ready:
	@$(PY) -c "import torch, numpy, pybind11, scikit_build_core, pytest" || \
		(echo "PYTHON=$(PY) needs torch, numpy, pybind11, scikit-build-core and pytest installed (and cmake >= 3.24" \
		      "with ninja or make on the PATH, or as Python packages)" && exit 1)

# Build against the torch in the environment (no build isolation). A system interpreter
# (PEP 668) needs --break-system-packages where pip knows it.
install: $(SETUP)
	@flags="--no-build-isolation --no-deps"; \
	if [ -n "$(PYTHON)" ] && $(PY) -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then \
		flags="$$flags --break-system-packages"; fi; \
	echo "$(PY) -m pip install $$flags ."; \
	$(PY) -m pip install $$flags . > build.log 2>&1 || { cat build.log; exit 1; }; \
	tail -n 1 build.log

test: install
	cd tests && $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m bench $(BENCH_ARGS)

info: install
	cd tests && $(PY) -m fastloss info

# On a machine with a GPU, one pass within GPU_CHECK_SECONDS: build for that GPU, the CUDA
# tests, memcheck on a small subset, the GPU benchmarks; logs and reports in GPU_CHECK_OUT.
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_SECONDS ?= 540
gpu-check: $(SETUP)
	PYTHON=$(PY) bash bench/gpu_check.sh $(GPU_CHECK_OUT) $(GPU_CHECK_SECONDS)

# The peers and test extras as wheels for an offline machine's Python (WHEEL_PYTHON), into a
# fresh .whl/ (bench/gpu_check.sh installs them from there; two versions of one package would
# make that install fail), which replaces the old one once every download worked.
WHEEL_PYTHON ?= 3.12
wheelhouse:
	rm -rf .whl.new
	python3 -m pip download --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl.new \
		pot geomloss cut-cross-entropy liger-kernel expecttest
	rm -rf .whl && mv .whl.new .whl

clean:
	rm -rf build dist $(VENV) .python-ready gpu-check
