# The two commands a new user needs: `make run` (serve the committed default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test install-train model lint bench soak clean proto

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamps re-install only when pyproject.toml changes.
$(VENV)/.serve: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[cpu]'
	touch $@

$(VENV)/.train: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[cpu,train]'
	touch $@ $(VENV)/.serve

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[cpu,train,dev]'
	touch $@ $(VENV)/.serve $(VENV)/.train

# Listens on every interface unless the environment says otherwise; every other setting (RESNET_PORT included)
# comes from the environment or make's command line, as for `python -m service`.
run: export RESNET_HOST ?= 0.0.0.0
run: $(VENV)/.serve
	$(PY) -m service

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# What training and export need on top of the service: torch, onnx, scikit-learn (docs/training.md).
install-train: $(VENV)/.train

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check contract model service bench tests

# Retrain and re-export the committed default model (resnet20 on the embedded digits plus synthetic pen-drawn ones,
# fit to content, augmented; ~1.5 min on 2 lightly loaded cores), then record its top-1 on the drawn-digits set.
model: $(VENV)/.train
	$(PY) -m model.train --data digits --arch resnet20 --epochs 20 --seed 0 --fit-to-content --synthetic 100 \
		--zoom 0.1 --stretch 0.2 --rotate 10 --shear 15 --translate 0.05 --thickness 1 --ink 0.5 \
		--out runs/default --export models/default.onnx
	$(PY) -m bench.drawn models/default.onnx --record

# Throughput: onnxruntime alone vs the naive app vs the service (batching off/on); needs wrk.
bench: $(VENV)/.dev
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(PY) -m bench.run $(BENCH_ARGS)

# Soak: 20,000 distinct images at concurrency 64 against a live server, each answer checked against its
# single-image prediction; RSS and open fds watched (~5 min on 2 cores). Not part of `make test`.
soak: $(VENV)/.dev
	$(PY) -m bench.soak $(SOAK_ARGS)

# The gRPC door's generated modules (committed): rerun after editing service/proto/inference.proto.
proto: $(VENV)/.dev
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. service/proto/inference.proto

clean:
	rm -rf $(VENV) runs .pytest_cache
