"""train.py default: DIYSink on the embedded default model and the embedded instruction set.

    python train.py --config configs/diysink.py --workdir runs/diysink            # stage 1
    python train.py --config configs/diysink.py --workdir runs/diysink_ft \\
        --config.stage=finetune --config.checkpoint=runs/diysink/export            # stage 2
    python train.py --config configs/diysink.py --workdir runs/diysink_rew \\
        --config.stage=rew --config.diysink.reweight=True \\
        --config.checkpoint=runs/diysink_ft/export \\
        --config.batch_size=20 --config.steps=60                                  # ReW

Learning rates per stage default to the published recipes (LLaVA-1.5 / TinyLLaVA: stage 1
projectors 1e-3, stage 2 2e-5 for projectors and LLM; the paper's ReW 1e-2), warmup 3% of the
steps, cosine decay; ``--config.optim.lrs.language_model=1e-5`` sets one group,
``--config.optim.lr`` every group.

The embedded default has random weights, so no token reaches the paper's threshold (tau = 100);
this config therefore marks the top-4 norms of each image as sinks. For a real LLaVA use
``--config.diysink.rule.rule=threshold``.
"""

import ml_collections

from vitsink_jax.embedded import embedded_shape


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.checkpoint = ""          # Hugging Face LLaVA folder (or a DIYSink export); "" = embedded
    c.llm = ""                 # with vision_tower instead of checkpoint: a base LLM folder / hub id
    c.vision_tower = ""        #   and a vision tower, joined by a new projector (as LLaVA-1.5 and
                               #   TinyLLaVA start stage 1; seeded by seed)
    c.stage = "pretrain"       # pretrain | finetune | rew (vitsink_jax.train_lib)
    c.finetune_parts = ("multi_modal_projector", "multi_modal_projector_sink", "language_model")
    c.steps = 40               # optimizer updates
    c.batch_size = 8           # global batch of one update (rows), split over devices and hosts
                               # (HF: per_device_train_batch_size x grad. accumulation x devices)
    c.length_bucket = 32       # sequences padded to a multiple of this (bounds recompiles)
    c.compute_dtype = "float32"  # float32 | bfloat16 (params, softmax, norms and loss stay fp32)
    c.remat = False            # recompute LLM layer activations in the backward pass (memory)
    c.remat_policy = "nothing_saveable"  # what remat may keep (vitsink_jax.REMAT_POLICIES)
    c.scan_layers = False      # LLM layers as one nn.scan: compile time and fsdp memory flat in depth
    c.attention_impl = "xla"   # xla | cudnn (GPU, bf16) | splash (TPU) | explicit: how the LLM attends
                               #   (vitsink_jax.models.attention.ATTENTION_IMPLS)
    c.parallel = "mesh"        # mesh | pmap
    c.fsdp = 1                 # mesh: devices per fsdp group (1 = no param sharding)
    c.tensor = 1               # mesh: tensor-parallel degree (vitsink_jax.parallel.TENSOR_RULES)
    c.dcn_data = 1             # mesh: slices the data axis spans over the data-centre network
                               #   (multi-slice TPU: the slice count; fsdp / tensor stay in a slice)
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.overwrite_export = False  # replace a workdir/export (or recipe publish_dir) holding files this
                                # workdir did not write there (refused otherwise)
    c.checkpoint_storage = "auto"  # auto | global (hosts share workdir, e.g. gs://) | per_process
    c.log_every = 1
    c.compile_cache = "auto"   # persistent XLA cache folder: auto (~/.cache/vitsink_jax/xla) | path | off
    c.nonfinite = "stop"       # a non-finite loss / update: stop (a loss: the checkpoints of that
                               # state set aside; an update: the state before it saved) | skip:
                               # keep the state, drop the batch, go on
    c.max_skips = 10           # skip: at most this many non-finite steps in a row; the next stops
    c.resume_changes = "refuse"  # refuse | allow: resume a checkpoint whose run settings
                                 # (train_resume.RUN_KEYS) differ from this config's

    # learning rates: optim.lrs.<group> > optim.lr (every group) > the stage's published default
    # (vitsink_jax.train_lib.STAGE_LR: pretrain 1e-3, finetune 2e-5, rew 1e-2); 0 = unset.
    # Warmup: warmup_steps when > 0, else warmup_ratio x steps; then cosine decay to
    # lr x final_lr_ratio (counted in optimizer updates). grad_clip: per projector in pretrain,
    # one global norm otherwise. grad_accum: each update's batch_size rows run as grad_accum
    # micro-batches of batch_size / grad_accum rows (memory); the update is the whole batch's
    # (loss normalised by the answer tokens of the whole batch), so results do not depend on it.
    c.optim = ml_collections.ConfigDict(dict(lr=0.0, warmup_ratio=0.03, warmup_steps=0,
                                             final_lr_ratio=0.0, weight_decay=0.0, b1=0.9,
                                             b2=0.999, grad_clip=1.0, grad_accum=1))
    c.optim.lrs = ml_collections.ConfigDict(dict(projectors=0.0, language_model=0.0,
                                                 vision_tower=0.0, reweighting=0.0))
    c.optim.loss_average = "tokens"  # every answer token of an update alike | "per_device_batch":
    c.optim.loss_group_rows = 0      #   the token mean per group of rows (the authors' per-device
                                     #   batch; 0 = this run's), averaged (transformers' Trainer)

    c.diysink = ml_collections.ConfigDict()
    c.diysink.enabled = True   # turn a stock LLaVA checkpoint into a DIYSink model first
    c.diysink.init = "copy"    # copy | scratch: how the sink projector starts
    c.diysink.rule = ml_collections.ConfigDict(dict(rule="topk", tau=100.0, k=4, max_fraction=0.1,
                                                    min_ratio=2.0))
    c.diysink.select = "all"
    c.diysink.reweight = False
    c.diysink.rew_hidden = 64
    c.diysink.question_encoder = "mean_embed"  # mean_embed | token_histogram | a registered name

    c.data = ml_collections.ConfigDict()
    c.data.json = ""           # LLaVA-format instruction JSON; "" = the embedded instruction set
    c.data.image_folder = ""   # images of data.json ("" = next to the JSON file)
    c.data.data_dir = ""       # tfds builders; "" = workdir/tfds
    c.data.variants = 2        # embedded set: overlays per photo (3 conversations each)
    c.data.image_size = 224
    c.data.mc_format = "letter"  # embedded set: answer with the option letter | "cloze": its text
    c.data.system = ""         # system prompt before the first turn: "" | "vicuna_v1" (LLaVA-1.5's,
                               #   = "tinyllava") | the text
    c.data.prefetch = 2        # batches computed ahead while a step runs (0 = each when needed);
                               # same batches, same order, same resume position either way
    c.data.workers = 2         # threads computing them (image decode / resize release the GIL)
    c.data.template = "chat"   # "chat": the model's chat markup | "plain": LLaVA's pre-training
                               # format (<image> caption \n) | "auto": plain in stage pretrain
    c.data.image_first = True  # each turn's <image> moved to its start, as LLaVA / TinyLLaVA train
    c.data.image_aspect_ratio = "auto"  # "auto": the checkpoint's own | "crop": the processor's |
                               # "pad": to a square with the mean colour first (LLaVA-1.5's
                               # stage 2); the export records it, so evaluation pads alike
    c.data.max_length = 0      # longest row in tokens, image expanded (0 = the LLM's positions)
    c.data.too_long = "skip"   # a longer row: "skip" (named in the build's manifest) | "truncate"
    c.data.build_workers = 2   # processes checking images and tokenizing while the data is built
    c.data.shard_rows = 1000   # source items per array_record shard (the unit a killed build resumes)
    c.data.shared_fs = False   # several hosts: data_dir is seen by all (NFS, a mounted bucket), so
                               # process 0 builds and the others read; False: each builds its own

    # multi-host runs (vitsink_jax.parallel.distributed_plan): mode "auto" starts jax.distributed
    # from the launcher's environment (TPU VM / pod, SLURM, mpirun) unless coordinator ("host:port",
    # with num_processes / process_id) is given; "off": one process whatever the environment says
    c.distributed = ml_collections.ConfigDict(dict(mode="auto", coordinator="", num_processes=1,
                                                   process_id=0, local_device_count=0))
    c.embedded = embedded_shape()  # shape of the embedded default model
    return c
