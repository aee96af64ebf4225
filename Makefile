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
# a stage that fails leaves no target behind, so a rerun redoes it (the scripts write their directories whole or not
# at all; this covers the files make itself names)
.DELETE_ON_ERROR:

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
	$(call timed,model,$(PY) tiny.py --out $(DEMO)/model --size demo)

$(DEMO)/data/train/tasks.json: | $(STAMP)
	$(call timed,data_train,$(PY) data.py --kind image --n 512 --seed 1 --out $(DEMO)/data/train)

$(DEMO)/data/heldout/tasks.json: | $(STAMP)
	$(call timed,data_heldout,$(PY) data.py --kind image --n 192 --seed 2 --out $(DEMO)/data/heldout)

# the cold start: SFT of the tiny model $(1) on scripted-expert trajectories of the tasks in $(3), written under a turn
# budget of $(5) rounds, into $(2). $(4) is the fraction of tool-requiring tasks the teacher answered without the
# tool: the demo's 0.4 gives a policy that under-uses the tool, the situation the paper's RL is for (with 0 it calls
# the tool on nearly every task and RL has only digit-copy slips left to fix: README "What this shows")
cold_start = $(PY) sft.py --model $(1) --image-tasks $(3) --output-dir $(2) \
		--epochs 6 --lr 2e-3 --max-turns $(5) --train-vision --direct-rate 0.5 --guess-rate $(4) $(SHORT)

$(DEMO)/sft/model/config.json: $(DEMO)/model/config.json $(DEMO)/data/train/tasks.json
	$(call timed,sft,$(call cold_start,$(DEMO)/model,$(DEMO)/sft,$(DEMO)/data/train/tasks.json,0.4,3))

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

# ---- the paper's ablations in miniature: each from one cold start, over seeds ---------------------------------------
#   make ablations                                     the image arms of ARMS, seeds 1 2 3 (about 2 h 45 min)
#   make ablations ARMS='full tool_coef_0' SEEDS='1 2'  a subset, or any arm below (the video pair, require_image...)
#   make ablations ARMS='full tool_coef_0' STEPS=80     longer runs (the image arms; under runs/ablations/steps80)
# (10-25 min per run on one core, two runs at a time; runs resume, finished ones are skipped). Each run's final
# checkpoint is evaluated greedily on held-out tasks; `eval.py ablation-report` writes runs/ablations/summary.json
# (per arm and seed: last-5-step means of tool calls, accuracy and turns, and the held-out accuracy), summary.md and
# curves.png.
ABL      := runs/ablations
SEEDS    := 1 2 3
# RL steps of the image arms (the demo preset's 40 by default); other lengths get their own directory of runs, which
# share the cold start, data and evaluation of the cold start under $(ABL)
STEPS    := 40
RUNS     := $(ABL)$(if $(filter 40,$(STEPS)),,/steps$(STEPS))
# the demo preset allows 3 rounds, i.e. a turn budget of 2 tool calls: `full` is also the budget-2 run of the pair
ARMS     := full tool_coef_0 no_std_sort std_norm turns_4
# more arms, run by name: video_on_demand video_full_context (the video pair), require_image and
# require_image_tool_coef_0 (the official run's has-image filter, ofr.py, with and without the tool bonus)
# the cold start's tasks: half ring_colour (locate, then zoom and read the returned figure: 2 calls, or 3 when the left
# ring is empty), the rest one single-call tool family and two tool-free ones (data.py)
ABL_FAMILIES := ring_colour,pixel_color,ring_colour,big_shape_color,ring_colour,count_big_squares
# RL's tasks (and the held-out ones): like the paper's RL data, mostly questions the policy can answer without the tool
# (big_shape_color: the cold start is right 0.99 of the time answering at once, 0.65 trying the tool, whose calls can
# fail) and a quarter that need several calls (ring_colour: 0.26 against 0.27): the pressure under which tool use
# collapses (docs/results.md, "Interaction collapse on a mixture mostly answerable without the tool")
ABL_RL_FAMILIES := big_shape_color,big_shape_color,big_shape_color,ring_colour
# their cold start writes up to 4 calls (so it has the 3-call trajectories) and answers a share of the tool-requiring
# tasks directly: a policy that can answer without the tool at a moderate accuracy, the pressure the tool reward is for
ABL_GUESS:= 0.3
ABL_MODEL:= $(ABL)/model
SEE_STEPS:= 400
ABL_SFT  := $(ABL)/sft/model
IMAGE_RUN:= --model $(ABL_SFT) --data $(ABL)/data/rl/tasks.json --max-steps $(STEPS)
# the video pair: the cold start continued on video expert trajectories, then RL on video tasks with the video only in
# the sandbox (on demand, the paper's method) or its frames in the prompt (full context, the baseline)
# (video code is longer than image code, and fetched frames come back as images: larger budgets; 12 steps)
VIDEO_ROLL:= --max-turn-tokens 384 --max-response-tokens 2048
VIDEO_RUN:= --data $(DEMO)/data/video_train/tasks.json $(VIDEO_ROLL) --max-steps 12

$(ABL)/data/train/tasks.json: | $(STAMP)
	$(PY) data.py --kind image --n 512 --seed 1 --families $(ABL_FAMILIES) --out $(ABL)/data/train

$(ABL)/data/rl/tasks.json: | $(STAMP)
	$(PY) data.py --kind image --n 512 --seed 3 --families $(ABL_RL_FAMILIES) --out $(ABL)/data/rl

$(ABL)/data/heldout/tasks.json: | $(STAMP)
	$(PY) data.py --kind image --n 144 --seed 2 --families $(ABL_RL_FAMILIES) --out $(ABL)/data/heldout

$(DEMO)/data/video_train/tasks.json: | $(STAMP)
	$(PY) data.py --kind video --n 96 --seed 1 --out $(DEMO)/data/video_train

$(DEMO)/data/video_heldout/tasks.json: | $(STAMP)
	$(PY) data.py --kind video --n 48 --seed 2 --out $(DEMO)/data/video_heldout

# the demo's tiny model with seeing pretraining added (tiny.py, pretrain_seeing): without it the policy cannot name
# the colour in a zoom it fetched, so ring_colour's calls cannot pay (docs/results.md, "Multi-call tasks")
$(ABL_MODEL)/config.json: $(DEMO)/model/config.json
	$(PY) tiny.py --out $(ABL_MODEL) --from $(DEMO)/model --see-steps $(SEE_STEPS)

$(ABL_SFT)/config.json: $(ABL_MODEL)/config.json $(ABL)/data/train/tasks.json
	$(call cold_start,$(ABL_MODEL),$(ABL)/sft,$(ABL)/data/train/tasks.json,$(ABL_GUESS),5)

# the cold start's held-out accuracy per family, sampled as RL samples (temperature 1, 2 samples): how often it calls
# the tool and what answering directly earns (results.md, "Per synthetic family")
$(ABL)/eval_sft/results.json: $(ABL_SFT)/config.json $(ABL)/data/heldout/tasks.json
	$(PY) eval.py --engine hf --model $(ABL_SFT) --output-dir $(ABL)/eval_sft --temperature 1 --samples 2 \
		--data $(ABL)/data/heldout/tasks.json $(SHORT) $(ROLL) --max-turns 5

# a video cold start per arm: the image cold start continued on video expert trajectories in that arm's layout (a
# policy cold-started on the on-demand layout writes no valid action with the frames in the prompt)
$(ABL)/video_sft_%/model/config.json: $(ABL_SFT)/config.json $(DEMO)/data/video_train/tasks.json
	$(PY) sft.py --model $(ABL_SFT) --n-image 0 --video-tasks $(DEMO)/data/video_train/tasks.json \
		--output-dir $(ABL)/video_sft_$* --epochs 10 --lr 2e-3 --max-turns 3 --video-context $* $(SHORT)

# training flags and held-out evaluation flags of each arm
flags_full               := $(IMAGE_RUN)
flags_tool_coef_0        := $(IMAGE_RUN) --tool-coef 0
flags_no_std_sort        := $(IMAGE_RUN) --no-std-sort
flags_std_norm           := $(IMAGE_RUN) --std-norm
flags_turns_4            := $(IMAGE_RUN) --max-turns 5
flags_require_image      := $(IMAGE_RUN) --require-image
flags_require_image_tool_coef_0 := $(IMAGE_RUN) --require-image --tool-coef 0
flags_video_on_demand    := $(VIDEO_RUN) --video-context on_demand --model $(ABL)/video_sft_on_demand/model
flags_video_full_context := $(VIDEO_RUN) --video-context full_context --model $(ABL)/video_sft_full_context/model
IMAGE_HELDOUT := --data $(ABL)/data/heldout/tasks.json $(SHORT) $(ROLL)
VIDEO_HELDOUT := --data $(DEMO)/data/video_heldout/tasks.json $(SHORT) --max-turns 3 $(VIDEO_ROLL)
heldout_full               := $(IMAGE_HELDOUT)
heldout_tool_coef_0        := $(IMAGE_HELDOUT)
heldout_no_std_sort        := $(IMAGE_HELDOUT)
heldout_std_norm           := $(IMAGE_HELDOUT)
heldout_turns_4            := $(IMAGE_HELDOUT) --max-turns 5
heldout_require_image      := $(IMAGE_HELDOUT)
heldout_require_image_tool_coef_0 := $(IMAGE_HELDOUT)
heldout_video_on_demand    := $(VIDEO_HELDOUT) --video-context on_demand
heldout_video_full_context := $(VIDEO_HELDOUT) --video-context full_context
arm = $(firstword $(subst -s, ,$(1)))
# seed by seed, so a stopped run of several arms leaves them with equal seeds
ABL_RUNS := $(foreach s,$(SEEDS),$(foreach a,$(ARMS),$(RUNS)/$(a)-s$(s)/eval/results.json))

# one run: runs/ablations/ARM-sSEED (ARM picks the flags above); the video arms also need their cold start
$(RUNS)/%/final/config.json: $(ABL_SFT)/config.json $(ABL)/data/rl/tasks.json
	$(PY) train.py --preset demo --seed $(lastword $(subst -s, ,$*)) --output-dir $(RUNS)/$* --resume \
		$(flags_$(call arm,$*)) --html-every 0
$(foreach s,$(SEEDS),$(RUNS)/video_on_demand-s$(s)/final/config.json): $(ABL)/video_sft_on_demand/model/config.json
$(foreach s,$(SEEDS),$(RUNS)/video_full_context-s$(s)/final/config.json): $(ABL)/video_sft_full_context/model/config.json

# a finished run's checkpoint is an intermediate of the pattern chain: without this make would delete its config.json
.PRECIOUS: $(RUNS)/%/final/config.json

# its final checkpoint on held-out tasks, greedy, under the budgets it trained with
$(RUNS)/%/eval/results.json: $(RUNS)/%/final/config.json $(ABL)/data/heldout/tasks.json $(DEMO)/data/video_heldout/tasks.json
	$(PY) eval.py --engine hf --model $(RUNS)/$*/final --output-dir $(RUNS)/$*/eval --temperature 0 $(heldout_$(call arm,$*))

# two runs at a time with one thread each: on 2 cores that is faster than one run with two threads
ablations: $(ABL_SFT)/config.json
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 $(ABL)/eval_sft/results.json $(ABL_RUNS)
	$(PY) eval.py ablation-report $(RUNS)
