# `make study`: the longer study behind the README's results. It reuses the shards and the MAE base model of
# `make reproduce` (and makes them when missing). Measured: 4,850 CPU seconds for its 42 steps (1 h 53 min of
# wall time on 2 cores shared with other jobs). Report: $(S)/report.md and figures; `make study-docs` copies
# them to docs/study/.
#
#   codecs   fp32 / fp16 / int8 / ecq stores of V = 2 views; a student from each, seeds $(STUDY_SEEDS):
#            accuracy delta against fp32 (paired over seeds, 95 % interval) and stored bytes per view
#   views    V = 1 / 2 / 4 / 8 stored views (the first V of one 8-view fp16 store) against the online student
#   masks    M = 1 / 2 masks per loaded view
#   sizes    nano / micro / mini students (width 48 / 96 / 144) from the one fp16 store
#   cost     base-model forward passes and measured CPU seconds of every step (repro/timed.py), and their
#            extrapolation to ImageNet ViT-B (docs/study: the method)
#
# The fp16 store holds 8 views; a V = 2 student reads its first 2 (`--views 2`), the same views as the other
# codecs' 2-view stores, because a view is keyed by (seed, row, view id). So `codec-fp16-s0` is also the V = 2,
# M = 1 and micro-size arm, and each question changes one thing against it. Every student trains for
# $(STUDY_E2) epochs (the reproduction's E2) with the reproduction's options; single-seed rows are marked so.

S ?= runs/study
STUDY_SEEDS ?= 0 1 2
STUDY_E2 ?= $(E2)
STUDY_CODECS ?= fp32 fp16 int8 ecq
STUDY_VIEWS ?= 1 4 8
STUDY_SIZES ?= tec_nano_p4_28 tec_mini_p4_28
STUDY_STORE_VIEWS := 8
STUDY_TRAIN = $(TEC) pretrain --shards $(R)/shards/train --epochs $(STUDY_E2) --att-tau $(ATT_TAU) $(TRAIN_OPTS)
CACHE_OPTS = --shards $(R)/shards/train --base-model $(R)/base.pth --topk $(TOPK) --chunk-rows 250 \
	--batch-size 250 --loader-workers $(LOADER_WORKERS)

# The order of the arms is the order make runs them: seed-major codec arms first (they decide the default
# codec), then the single-seed questions.
STUDY_ARMS := $(foreach s,$(STUDY_SEEDS),$(foreach c,$(STUDY_CODECS),codec-$(c)-s$(s))) \
	online-s0 $(addsuffix -s0,$(addprefix views-v,$(STUDY_VIEWS))) masks-m2-s0 \
	$(addsuffix -s0,$(addprefix size-,$(STUDY_SIZES)))

.PHONY: study study-docs
study: install $(S)/report.md
	@echo "report: $(S)/report.md"

$(S)/store-fp16.zarr/zarr.json: $(R)/base.pth
	$(call timed,$(S),cache-fp16,$(TEC) cache-targets $(CACHE_OPTS) --out $(S)/store-fp16.zarr --views $(STUDY_STORE_VIEWS) --codec fp16)
$(S)/store-%.zarr/zarr.json: $(R)/base.pth
	$(call timed,$(S),cache-$*,$(TEC) cache-targets $(CACHE_OPTS) --out $(S)/store-$*.zarr --views 2 --codec $*)

# codec-<codec>-s<seed>: the stem is "<codec>-s<seed>"
$(S)/codec-%/done: $(S)/store-fp16.zarr/zarr.json $(S)/store-fp32.zarr/zarr.json $(S)/store-int8.zarr/zarr.json \
		$(S)/store-ecq.zarr/zarr.json
	$(call timed,$(S),codec-$*,$(STUDY_TRAIN) --targets $(S)/store-$(firstword $(subst -s, ,$*)).zarr --views 2 --out $(S)/codec-$* --seed $(lastword $(subst -s, ,$*)))
	touch $@
$(S)/online-s%/done: $(R)/base.pth
	$(call timed,$(S),online-s$*,$(STUDY_TRAIN) --base-model $(R)/base.pth --topk $(TOPK) --out $(S)/online-s$* --seed $*)
	touch $@
$(S)/views-v%-s0/done: $(S)/store-fp16.zarr/zarr.json
	$(call timed,$(S),views-v$*-s0,$(STUDY_TRAIN) --targets $(S)/store-fp16.zarr --views $* --out $(S)/views-v$*-s0 --seed 0)
	touch $@
$(S)/masks-m%-s0/done: $(S)/store-fp16.zarr/zarr.json
	$(call timed,$(S),masks-m$*-s0,$(STUDY_TRAIN) --targets $(S)/store-fp16.zarr --views 2 --masks-per-view $* --out $(S)/masks-m$*-s0 --seed 0)
	touch $@
$(S)/size-%-s0/done: $(S)/store-fp16.zarr/zarr.json
	$(call timed,$(S),size-$*-s0,$(STUDY_TRAIN) --targets $(S)/store-fp16.zarr --views 2 --model $* --out $(S)/size-$*-s0 --seed 0)
	touch $@

# every step's output is kept (see reproduce.mk's .PRECIOUS)
.PRECIOUS: $(S)/%/done $(S)/store-%.zarr/zarr.json

# one feature extraction for both frozen evaluations, straight from the run's checkpoint
$(foreach a,$(STUDY_ARMS),$(S)/evals/$(a)-knn.json): $(S)/evals/%-knn.json: $(S)/%/done $(R)/shards/test/manifest.json
	$(call timed,$(S),eval-$*,$(TEC) frozen-eval --checkpoint $(S)/$*/checkpoint.pth $(EVAL_OPTS) --json-prefix $(S)/evals/$*,$(EVAL_THREADS))

# what the numbers were made with, written before the first step (make builds prerequisites in order)
$(S)/provenance.txt:
	@mkdir -p $(S)
	@echo "made by \`make study$(if $(MAKEOVERRIDES), $(MAKEOVERRIDES))\` on commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes'), started $$(date -u '+%Y-%m-%d %H:%M UTC')" > $@

$(S)/report.md: $(S)/provenance.txt $(foreach a,$(STUDY_ARMS),$(S)/evals/$(a)-knn.json)
	$(TEC) report $(S) --study --e2 $(STUDY_E2)

study-docs: $(S)/report.md
	mkdir -p docs/study && cp $(S)/report.md $(S)/*.png $(S)/results.json docs/study/
