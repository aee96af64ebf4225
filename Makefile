# Two commands do everything on a fresh machine (README "Quickstart"):
#   make test   install into .venv, then run the test suite
#   make demo   install into .venv, then run the CPU demo; every stage's output is a file, so a rerun skips
#               finished stages and the RL stage resumes from its last checkpoint
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo ablations clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel first: with it in place the project's torch range pulls no CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# ---- the CPU demo: tiny model -> cold start (SFT) -> GRPO with OFR + tool reward -> held-out evaluation ------------
DEMO   := runs/demo
TIME    = $(DEMO)/timings
# run a stage and record its wall time (seconds) in $(TIME)/<name>.s, so the summary adds up only work really done
timed   = @mkdir -p $(TIME); start=$$(date +%s.%N); $(2) && echo "$$(date +%s.%N) $$start" | awk '{print $$1 - $$2}' > $(TIME)/$(1).s
SHORT  := --template-key short
ROLL   := --max-turns 3 --max-turn-tokens 160 --max-response-tokens 768

demo: $(DEMO)/summary.json
	@cat $(DEMO)/summary.md

$(DEMO)/model/config.json: | $(STAMP)
	$(call timed,model,$(PY) models.py tiny --out $(DEMO)/model --size demo)

$(DEMO)/data/train/tasks.json: | $(STAMP)
	$(call timed,data_train,$(PY) data.py --kind image --n 512 --seed 1 --out $(DEMO)/data/train)

$(DEMO)/data/heldout/tasks.json: | $(STAMP)
	$(call timed,data_heldout,$(PY) data.py --kind image --n 96 --seed 2 --out $(DEMO)/data/heldout)

$(DEMO)/sft/model/config.json: $(DEMO)/model/config.json $(DEMO)/data/train/tasks.json
	$(call timed,sft,$(PY) sft.py --model $(DEMO)/model --image-tasks $(DEMO)/data/train/tasks.json \
		--output-dir $(DEMO)/sft --epochs 8 --lr 2e-3 --max-turns 3 $(SHORT))

$(DEMO)/eval_sft/results.json: $(DEMO)/sft/model/config.json $(DEMO)/data/heldout/tasks.json
	$(call timed,eval_sft,$(PY) eval.py --engine hf --model $(DEMO)/sft/model --data $(DEMO)/data/heldout/tasks.json \
		--output-dir $(DEMO)/eval_sft --temperature 0 $(SHORT) $(ROLL))

$(DEMO)/rl/final/config.json: $(DEMO)/sft/model/config.json $(DEMO)/data/train/tasks.json
	$(call timed,rl,$(PY) train.py --preset demo --model $(DEMO)/sft/model --data $(DEMO)/data/train/tasks.json \
		--output-dir $(DEMO)/rl --resume)

$(DEMO)/eval_rl/results.json: $(DEMO)/rl/final/config.json $(DEMO)/data/heldout/tasks.json
	$(call timed,eval_rl,$(PY) eval.py --engine hf --model $(DEMO)/rl/final --data $(DEMO)/data/heldout/tasks.json \
		--output-dir $(DEMO)/eval_rl --temperature 0 $(SHORT) $(ROLL))

$(DEMO)/summary.json: $(DEMO)/eval_sft/results.json $(DEMO)/eval_rl/results.json
	$(PY) eval.py demo-summary --sft-eval $(DEMO)/eval_sft --rl-eval $(DEMO)/eval_rl --train-dir $(DEMO)/rl \
		--timings-dir $(TIME) --out $(DEMO)

clean:
	rm -rf runs

# ---- the paper's ablations in miniature: each from the demo's cold-start checkpoint, 2 seeds ------------------------
# (several minutes per run on 2 cores: ~1 h in all; runs resume, finished ones are skipped)
ABL      := runs/ablations
SEEDS    := 1 2
ABLATIONS:= full tool_coef_0 no_std_sort std_norm turns_2 turns_4
flags_full        :=
flags_tool_coef_0 := --tool-coef 0
flags_no_std_sort := --no-std-sort
flags_std_norm    := --std-norm
flags_turns_2     := --max-turns 3
flags_turns_4     := --max-turns 5

ablations: $(DEMO)/sft/model/config.json $(DEMO)/data/train/tasks.json
	@for a in $(ABLATIONS); do for s in $(SEEDS); do \
		case $$a in full) f="$(flags_full)";; tool_coef_0) f="$(flags_tool_coef_0)";; no_std_sort) f="$(flags_no_std_sort)";; \
		std_norm) f="$(flags_std_norm)";; turns_2) f="$(flags_turns_2)";; turns_4) f="$(flags_turns_4)";; esac; \
		test -f $(ABL)/$$a-s$$s/final/config.json || $(PY) train.py --preset demo --model $(DEMO)/sft/model \
			--data $(DEMO)/data/train/tasks.json --seed $$s --output-dir $(ABL)/$$a-s$$s --resume $$f || exit 1; \
	done; done
	$(PY) eval.py ablation-report $(ABL)
