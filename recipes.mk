# ImageNet recipes: the six rows of the TEC results table (spec §4 pretraining, §8 fine-tuning).
#
#   make imagenet-tec-b300-mae DATA=/data/imagenet BASE=/ckpt/mae_pretrain_vit_base.pth GPUS=8
#
# DATA holds train/ and val/ as class folders (or set TRAIN_SHARDS/VAL_SHARDS to existing WebDataset shards
# with a manifest: `tec index-shards DIR`). BASE is the base model's checkpoint. Every run goes to
# $(IMAGENET_OUT)/<recipe>/. Pretraining: 8 GPUs x 256 x accum 2 = 4096, blr 1.5e-4 (lr 2.4e-3), warm-up
# 40 epochs, wd 0.05, mask 0.75, last_layers 2, MLP CLS token and attention target on. The published runs
# drew a fresh view every step; the cache holds VIEWS views per image (see README, "Views").

DATA ?= /data/imagenet
BASE ?= base.pth
GPUS ?= 8
NNODES ?= 1
VIEWS ?= 2
CODEC ?= fp16
IMAGENET_OUT ?= runs/imagenet
TRAIN_SHARDS ?= $(IMAGENET_OUT)/shards/train
VAL_SHARDS ?= $(IMAGENET_OUT)/shards/val
TORCHRUN ?= $(VENV)/bin/torchrun --nnodes $(NNODES) --nproc_per_node $(GPUS)

# name | base arch | k | tau | pretrain epochs | ft batch | ft accum | ft blr | layer decay | ft epochs | ft warm-up | ft min lr
RECIPE_tec-b100-mae300 := vit_base_patch16_224 15 1.8 100 128 1 5e-4 0.65 100 5 1e-6
RECIPE_tec-b300-mae    := vit_base_patch16_224 15 1.8 300 128 1 5e-4 0.65 100 20 1e-6
RECIPE_tec-b800-mae    := vit_base_patch16_224 15 1.8 800 128 1 5e-4 0.55 100 20 1e-6
RECIPE_tec-b300-ibot   := vit_base_patch16_224 9 1.0 300 128 1 5e-4 0.50 100 5 1e-6
RECIPE_tec-b800-ibot   := vit_base_patch16_224 9 1.0 800 128 1 5e-4 0.55 100 20 1e-6
RECIPE_tec-l300-mae    := vit_large_patch16_224 15 1.4 300 64 2 1e-3 0.65 50 5 1e-5
IMAGENET_RECIPES := tec-b100-mae300 tec-b300-mae tec-b800-mae tec-b300-ibot tec-b800-ibot tec-l300-mae

.PHONY: imagenet-shards $(addprefix imagenet-,$(IMAGENET_RECIPES))

imagenet-shards: install
	@test -f $(TRAIN_SHARDS)/manifest.json || $(TEC) make-shards imagefolder:$(DATA)/train --out $(TRAIN_SHARDS) --split train --shard-size 1000
	@test -f $(VAL_SHARDS)/manifest.json || $(TEC) make-shards imagefolder:$(DATA)/val --out $(VAL_SHARDS) --split val --shard-size 1000

# $(1): recipe name; the fields of RECIPE_$(1) in order
define imagenet_recipe
imagenet-$(1): imagenet-shards
	$$(TEC) cache-targets --shards $$(TRAIN_SHARDS) --base-model $$(BASE) --base-arch $(word 1,$(RECIPE_$(1))) \
		--out $$(IMAGENET_OUT)/$(1)/targets.zarr --views $$(VIEWS) --topk $(word 2,$(RECIPE_$(1))) --last-layers 2 \
		--codec $$(CODEC) --batch-size 512 --chunk-rows 256 --loader-workers 8
	$$(TORCHRUN) cli.py pretrain --targets $$(IMAGENET_OUT)/$(1)/targets.zarr --shards $$(TRAIN_SHARDS) \
		--out $$(IMAGENET_OUT)/$(1)/pretrain --epochs $(word 4,$(RECIPE_$(1))) --batch-size 256 --accum 2 \
		--blr 1.5e-4 --warmup-epochs 40 --weight-decay 0.05 --mask-ratio 0.75 --att-tau $(word 3,$(RECIPE_$(1))) \
		--topk $(word 2,$(RECIPE_$(1))) --workers 10 --save-every 1000
	$$(TEC) convert $$(IMAGENET_OUT)/$(1)/pretrain/checkpoint.pth --out $$(IMAGENET_OUT)/$(1)/encoder.safetensors
	$$(TORCHRUN) cli.py finetune --checkpoint $$(IMAGENET_OUT)/$(1)/encoder.safetensors \
		--train-shards $$(TRAIN_SHARDS) --test-shards $$(VAL_SHARDS) --out $$(IMAGENET_OUT)/$(1)/finetune \
		--json $$(IMAGENET_OUT)/$(1)/finetune.json --batch-size $(word 5,$(RECIPE_$(1))) --accum $(word 6,$(RECIPE_$(1))) \
		--blr $(word 7,$(RECIPE_$(1))) --layer-decay $(word 8,$(RECIPE_$(1))) --epochs $(word 9,$(RECIPE_$(1))) \
		--warmup-epochs $(word 10,$(RECIPE_$(1))) --min-lr $(word 11,$(RECIPE_$(1))) --weight-decay 0.05 \
		--drop-path 0.1 --mixup 0.8 --cutmix 1.0 --smoothing 0.1 --reprob 0.25 --aa rand-m9-mstd0.5-inc1 --workers 10
endef
$(foreach r,$(IMAGENET_RECIPES),$(eval $(call imagenet_recipe,$(r))))
