# The README's commands. Each creates .venv and installs the project on first use.
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
DEMO_EXPERIMENT ?= taxonclip-demo

.PHONY: install demo test test-all server bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,postgres,dashboard,auth]'
	touch $(STAMP)

install: $(STAMP)

# Generated specimens -> pretrained baseline -> fine-tuning -> comparison, all logged to MLflow.
demo: $(STAMP)
	MLFLOW_EXPERIMENT_NAME=$(DEMO_EXPERIMENT) $(PY) -m taxonclip data check synthetic
	MLFLOW_EXPERIMENT_NAME=$(DEMO_EXPERIMENT) $(PY) -m taxonclip eval --model tiny
	MLFLOW_EXPERIMENT_NAME=$(DEMO_EXPERIMENT) $(PY) -m taxonclip train --model tiny --epochs 8 \
		--batch_size 64 --lr 2e-3 --lr_pfc_weight 10 --weight_decay 0.05 --margin_s 16 --margin_m2 0.2
	MLFLOW_EXPERIMENT_NAME=$(DEMO_EXPERIMENT) $(PY) -m taxonclip compare \
		--experiments $(DEMO_EXPERIMENT) --out reports/demo

test: $(STAMP)
	$(PY) -m pytest -q

# Everything, the slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

server: $(STAMP)
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db \
		--artifacts-destination ./mlartifacts --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(PY) bench/eval_knn.py

clean:
	rm -rf reports outputs .pytest_cache
