"""Training pieces used by train.py: what trains in each stage, the optimizer, the loss and the
step function, for one device, a device mesh or pmap.

Stages (paper Sec. 4.2 and the training recipe):
* ``pretrain``: connector pre-training. ViT and LLM frozen. For a DIYSink model each projector
  sees only its own tokens: loss = LM loss with sink-only input (through f_sink) + LM loss with
  non-sink-only input (through f_nonsink); for a plain LLaVA the usual LM loss.
* ``finetune``: instruction tuning on the full visual input; the trained parts are a config field
  (default: both projectors and the LLM).
* ``rew``: only DIYSink's reweighting MLP trains (paper: ~120-240 samples, 10 epochs, lr 1e-2,
  batch 20).

Optimizer: AdamW with one learning rate per param group (projectors, language model, vision
tower, ReW), by default the stage's published rate (:data:`STAGE_LR`), warmup (ratio 0.03 of the
steps) + cosine decay, counted in optimizer updates; gradients clipped by global norm, per
projector in ``pretrain``.

The loss is next-token cross-entropy over answer tokens only, summed over every row of the
update's batch and divided by the number of answer tokens of that whole batch (all gradient
accumulation micro-batches, devices and hosts), so one device, a mesh, pmap and any
``grad_accum`` compute the same number. The model runs without its LM head and the loss
applies the head only to the answer tokens, a chunk of them at a time
(:func:`chunked_answer_nll_sum`): no [B, T, V] logits are ever held. The frozen params enter
the loss as constants, so a frozen vision tower (every stage by default) runs its forward
alone, in the compute dtype its params were loaded in: no backward is built for it. Gradient accumulation happens inside the step: the
batch of one update is split into ``grad_accum`` micro-batches (a ``lax.scan``: activations
for one micro-batch at a time), their gradients are summed, then one optimizer update is made;
with pmap or pure data parallelism on a mesh the gradients are reduced over the devices once
per update, after the micro-batches (:func:`make_train_step`).
Only the trainable params get gradients and optimizer state; the frozen ones are never touched,
so they stay bitwise equal. The models are deterministic (no dropout), so the step takes no RNG
key; a stochastic layer would need one folded with the device / process index.
"""

from __future__ import annotations

import ctypes
import math
import sys

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from . import parallel

STAGES = ("pretrain", "finetune", "rew")
PROJECTORS = ("multi_modal_projector", "multi_modal_projector_sink")
# default peak learning rate per stage (optim.lr / optim.lrs override it): LLaVA-1.5's and
# TinyLLaVA's published recipes (stage 1 projectors 1e-3, stage 2 2e-5), the paper's ReW 1e-2
STAGE_LR = {"pretrain": 1e-3, "finetune": 2e-5, "rew": 1e-2}
# top-level param group -> learning-rate group (optim.lrs keys)
LR_GROUPS = {"multi_modal_projector": "projectors", "multi_modal_projector_sink": "projectors",
             "language_model": "language_model", "vision_tower": "vision_tower",
             "reweighting": "reweighting"}


def trainable_parts(stage: str, finetune_parts=("multi_modal_projector", "multi_modal_projector_sink",
                                                "language_model")) -> tuple:
    """Top-level param groups that train in ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    return {"pretrain": PROJECTORS, "finetune": tuple(finetune_parts), "rew": ("reweighting",)}[stage]


def split_params(params: dict, parts: tuple) -> tuple[dict, dict]:
    """(trainable, frozen): the top-level groups in ``parts`` and the rest."""
    missing = [p for p in parts if p in ("reweighting",) and p not in params]
    if missing or not any(p in params for p in parts):
        raise ValueError(f"nothing to train: parts {parts} not in the model's params "
                         f"{sorted(params)} (the rew stage needs diysink.reweight=True)")
    return ({k: v for k, v in params.items() if k in parts},
            {k: v for k, v in params.items() if k not in parts})


def lr_group(part: str) -> str:
    """The learning-rate group (:data:`LR_GROUPS`) of a top-level param group."""
    if part not in LR_GROUPS:
        raise ValueError(f"no learning-rate group for param group {part!r}; known: {sorted(LR_GROUPS)}")
    return LR_GROUPS[part]


def group_lrs(cfg, stage: str, parts) -> dict:
    """{lr group: peak learning rate} for the trainable top-level ``parts`` in ``stage``.

    Per group: ``cfg.lrs[group]`` when > 0, else ``cfg.lr`` when > 0 (one rate for every
    group, e.g. the mini study's explicit recipe), else the stage's published default
    (:data:`STAGE_LR`: LLaVA-1.5 / TinyLLaVA stage 1 projectors 1e-3, stage 2 2e-5, the paper's
    ReW 1e-2)."""
    if stage not in STAGE_LR:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    lrs = dict(cfg.get("lrs") or {})
    unknown = sorted(set(lrs) - set(LR_GROUPS.values()))
    if unknown:
        raise ValueError(f"optim.lrs names unknown groups {unknown}; groups: "
                         f"{sorted(set(LR_GROUPS.values()))}")
    return {lr_group(p): lrs.get(lr_group(p), 0.0) or cfg.lr or STAGE_LR[stage] for p in parts}


def warmup_steps(cfg, total_steps: int) -> int:
    """Warmup length: ``cfg.warmup_steps`` when > 0, else ceil(``cfg.warmup_ratio`` x
    ``total_steps``) (the rule of HF Trainer's warmup_ratio, LLaVA-1.5's 0.03)."""
    if cfg.get("warmup_steps", 0) > 0:
        return int(cfg.warmup_steps)
    return math.ceil(cfg.get("warmup_ratio", 0.0) * total_steps)


def make_schedule(cfg, lr: float, total_steps: int):
    """Linear warmup from 0 to ``lr`` over :func:`warmup_steps`, then cosine decay to
    ``lr * cfg.final_lr_ratio`` at ``total_steps`` (counted in optimizer updates)."""
    warm = max(warmup_steps(cfg, total_steps), 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1),
                                              end_value=lr * cfg.final_lr_ratio)


def part_labels(tree: dict) -> dict:
    """Every leaf of a {top-level group: subtree} dict labelled with its group's name."""
    return {k: jax.tree_util.tree_map(lambda _, k=k: k, v) for k, v in tree.items()}


def clip_gradients(stage: str, parts, max_norm: float):
    """Gradient clipping by global norm: in ``pretrain`` each top-level part (each projector)
    by its own norm, as each projector is pre-trained on its own loss (paper Sec. 4.2); in the
    other stages one norm over every trainable param (LLaVA's max_grad_norm)."""
    if stage == "pretrain":
        return optax.multi_transform({p: optax.clip_by_global_norm(max_norm) for p in parts},
                                     part_labels)
    return optax.clip_by_global_norm(max_norm)


def make_optimizer(cfg, total_steps: int, stage: str, parts):
    """AdamW with a learning rate per group (:func:`group_lrs`, each with linear warmup and
    cosine decay, :func:`make_schedule`) and gradient clipping (:func:`clip_gradients`).
    ``total_steps``: optimizer updates (gradient accumulation is done by the train step,
    :func:`make_train_step`, so every ``tx.update`` is an applied update and the schedules count
    exactly those). ``parts``: the trainable top-level param groups. Returns (optimizer, {lr
    group: learning-rate schedule})."""
    parts = tuple(parts)
    schedules = {g: make_schedule(cfg, lr, total_steps) for g, lr in group_lrs(cfg, stage, parts).items()}
    adam = {p: optax.adamw(schedules[lr_group(p)], b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
            for p in parts}
    return optax.chain(clip_gradients(stage, parts, cfg.grad_clip),
                       optax.multi_transform(adam, part_labels)), schedules


def label_nll_sum(logits, labels, mask):
    """Summed NLL of ``labels`` [B, C] under float32 ``logits`` [B, C, V] where ``mask`` [B, C]
    is True (or weighted by it, when float). Returns a float32 scalar."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    if mask.dtype == jnp.bool_:
        return jnp.sum(jnp.where(mask, nll, 0.0))
    return jnp.sum(jnp.where(mask != 0, nll * mask, 0.0))


LOSS_AVERAGES = ("tokens", "per_device_batch")


def group_weights(loss_mask, group_rows: int, groups: int):
    """[B] float32 weight of each row's summed NLL when the loss averages per group of rows, as
    the LLaVA-1.5 / TinyLLaVA trainers (transformers' Trainer with DDP) average: the token mean
    of each device's micro-batch, then the mean of those over devices and accumulation steps.
    ``loss_mask`` [B, T]: B rows in consecutive groups of ``group_rows`` (the authors'
    per-device batch); a row of group g gets 1 / (answer tokens of g x ``groups``), ``groups``
    the groups of the whole update. A group without answer tokens adds nothing."""
    tokens = jnp.sum(loss_mask[:, 1:], axis=1).reshape(-1, group_rows).sum(axis=1)
    per_group = 1.0 / (jnp.maximum(tokens, 1).astype(jnp.float32) * groups)
    return jnp.repeat(per_group, group_rows)


def answer_nll_sum(logits, ids, loss_mask):
    """Summed next-token NLL over answer tokens: logits [B, T, V] (position t predicts t + 1),
    ids [B, T], loss_mask [B, T] (True at answer tokens). Returns a float32 scalar.

    The log-softmax runs in float32 on the model's logits, which are float32 in every compute
    dtype (the LM head accumulates and outputs float32: models.llm.head_dot_general), so a bf16
    run's loss reads logits that were never rounded to bf16."""
    return label_nll_sum(logits[:, :-1], ids[:, 1:], loss_mask[:, 1:])


LOSS_CHUNK = 256  # tokens per row whose logits the training loss holds at once
SMALLEST_BUCKET = 16  # the fewest supervised positions per row the loss is compiled for
BUCKET_GROWTH = 4     # each bucket this many times the one before


def loss_buckets(n: int, smallest: int = SMALLEST_BUCKET, growth: int = BUCKET_GROWTH) -> tuple:
    """The static counts of positions per row the loss is compiled for, over ``n`` predicting
    positions: ``smallest``, ``growth`` times that, ... below ``n``, then ``n``. Each count is a
    branch compiled into the step (the head and log-softmax, forward and backward): growth 4
    compiles half the branches of growth 2 (one branch instead of five made a tiny training
    test's step compile ~20% faster), and the
    head runs over at most 4x the longest answer's positions, still a small share of the step
    (the head's FLOPs per position are about one decoder layer's)."""
    sizes, m = [], min(smallest, n)
    while m < n:
        sizes.append(m)
        m *= growth
    return tuple(sizes) + (n,)


def supervised_first(mask) -> jax.Array:
    """[B, n] int32: each row's positions with those where ``mask`` [B, n] is nonzero first,
    in order, then the rest (a stable sort)."""
    return jnp.argsort(mask == 0, axis=1, stable=True).astype(jnp.int32)


def chunked_answer_nll_sum(hidden, head, ids, loss_mask, chunk: int = LOSS_CHUNK):
    """:func:`answer_nll_sum` from the hidden states, the LM head run only where there is loss
    and never over the logits of every token: hidden [B, T, D] (after the final norm; position
    t predicts t + 1), ``head`` [B, C, D] -> float32 logits [B, C, V] (the model's LM head), ids
    and loss_mask [B, T].

    Each row's supervised positions are gathered first (:func:`supervised_first`); the head and
    the log-softmax run over the first m of them, m the smallest of :func:`loss_buckets` that
    holds the most supervised positions of any row (a ``lax.switch`` over those static counts:
    no recompile as answers change length; 16 answer tokens of 287 positions run 16, not 287).
    The m positions run ``chunk`` at a time (a ``lax.scan``, the last chunk padded with
    unsupervised positions), each chunk under ``jax.checkpoint``: forward and backward hold one
    chunk's [B, chunk, V] logits, not [B, T, V] (the TinyLLaVA recipe's 4 rows x 2048 tokens x
    151936 vocabulary are 4.6 GiB of float32 per copy). Each chunk's rows stay split over the
    mesh's batch axes (:func:`parallel.constrain_rows`), so XLA gathers the vocabulary-sharded
    head rather than the rows of the whole batch. Returns a float32 scalar."""
    mask = loss_mask[:, 1:]
    order = supervised_first(mask)
    pick = lambda x: jnp.take_along_axis(  # noqa: E731
        x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    h, labels, mask = pick(hidden[:, :-1]), pick(ids[:, 1:]), pick(mask)

    @jax.checkpoint
    def one(total, piece):
        h_c, y_c, m_c = piece
        logits = parallel.constrain_rows(head(parallel.constrain_rows(h_c)))
        return total + label_nll_sum(logits, y_c, m_c), None

    def first(m: int):
        """The summed NLL of the first ``m`` gathered positions of every row."""
        c = min(chunk, m)
        pad = -m % c

        def chunks(x):  # [B, m, ...] -> [m / c, B, c, ...], zero padded
            x = jnp.pad(x[:, :m], [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return jnp.swapaxes(x.reshape((x.shape[0], -1, c) + x.shape[2:]), 0, 1)

        def run(h, labels, mask):
            total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32),
                                    (chunks(h), chunks(labels), chunks(mask)))
            return total
        return run

    sizes = loss_buckets(h.shape[1])
    count = jnp.max(jnp.sum(mask != 0, axis=1))
    bucket = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count.astype(jnp.int32))
    return jax.lax.switch(bucket, [first(m) for m in sizes], h, labels, mask)


def loss_fn(model, stage: str, chunk: int = LOSS_CHUNK):
    """``loss(trainable, frozen, batch, n_tokens) -> loss`` for ``stage``; ``batch`` holds
    ids, mask, loss_mask, question_mask [B, T], pixels [B, C, H, W] and optionally has_image [B]
    (False: a text-only row, :meth:`LlavaForConditionalGeneration.__call__`) and loss_weight [B]
    (each row's NLL scaled by it: :func:`group_weights`); ``n_tokens`` is the number of answer
    tokens of the whole batch of the optimizer update (every micro-batch, device and host) the
    summed NLL is divided by (1 with loss_weight), so the losses (and gradients) of the pieces
    of a batch add up to those of the batch. The model runs without its LM head
    (``head=False``); the NLL applies the head ``chunk`` tokens at a time
    (:func:`chunked_answer_nll_sum`). Each row holds one image (the training data's rows), so
    its features merge row by row (``one_image_per_row``: no gather across the batch)."""
    dual = model.config.diysink is not None

    def nll(params, batch, route):
        out = model.apply({"params": params}, batch["ids"], batch["pixels"],
                          attention_mask=batch["mask"], question_mask=batch["question_mask"],
                          route=route, head=False, one_image_per_row=True,
                          **{k: batch[k] for k in ("has_image",) if k in batch})
        head = lambda h: model.apply({"params": params}, h, method="head")  # noqa: E731
        weights = batch["loss_mask"] if "loss_weight" not in batch else (
            batch["loss_mask"] * batch["loss_weight"][:, None])
        return chunked_answer_nll_sum(parallel.constrain_rows(out.last_hidden_state), head,
                                      batch["ids"], weights, chunk)

    def loss(trainable, frozen, batch, n_tokens):
        params = {**frozen, **trainable}
        if stage == "pretrain" and dual:
            ones = jnp.ones((batch["ids"].shape[0],), jnp.int32)
            total = nll(params, batch, ones) + nll(params, batch, 2 * ones)  # sink-, non-sink-only
        else:
            total = nll(params, batch, None)
        return total / jnp.maximum(n_tokens, 1)

    return loss


def micro_batches(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B / k, ...] for every array: micro-batch j holds rows j, j + k, j + 2k, ...
    A device holding a contiguous block of rows whose length is a multiple of ``k`` (mesh) or
    its own rows (pmap) thus holds its share of every micro-batch: no data moves between devices,
    and mesh and pmap form the same micro-batches."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return {name: split(x) for name, x in batch.items()}


def keep_host_memory() -> bool:
    """Makes glibc's malloc keep and reuse the host memory a training step frees, instead of
    handing it back to the kernel and faulting it in again on the next step. Call it once at
    program start, before JAX runs anything (train.py's CLI does): a thread that has already
    allocated keeps its own arena.

    Why: XLA:CPU allocates the temporaries of one step as a single block (445 MB for the
    medium LLaVA's full fine-tuning step, benchmarks/train_step.py) on a worker thread. glibc
    serves a block that large in a thread's arena by ``mmap`` whatever its settings (a thread
    arena holds at most 64 MB) and frees it by ``munmap``, so every step faulted in ~109k fresh
    zeroed pages: ~0.25 s of system CPU per step (the step took 1.08x its time on an idle
    2-core host, 1.75x with the cores shared with another job). With one arena (``M_ARENA_MAX=1``), no ``mmap``
    (``M_MMAP_MAX=0``) and no trimming (``M_TRIM_THRESHOLD=-1``) the block comes from the heap
    and stays mapped: 0 faults per step after the first. The cost: memory freed is kept by the
    process (its resident size stays at its peak, which a training process reaches every
    step anyway) and threads share one malloc arena. Returns False, changing nothing, without
    glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # no glibc
        return False
    m_arena_max, m_mmap_max, m_trim_threshold = -8, -4, -1  # glibc's <malloc.h>
    return all(mallopt(opt, value) == 1
               for opt, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf of ``tree`` is finite (a bool scalar)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def data_parallel_mesh(mesh) -> bool:
    """Whether ``mesh`` is pure data parallelism over several devices (fsdp = tensor = 1): every
    device holds every param whole."""
    return mesh is not None and mesh.size > 1 and mesh.shape["fsdp"] == mesh.shape["tensor"] == 1


def make_train_step(model, tx, schedules: dict, stage: str, axis_name=None, grad_accum: int = 1,
                    mesh=None, loss_chunk: int = LOSS_CHUNK, loss_average: str = "tokens",
                    group_rows: int = 0):
    """``step(state, frozen, batch) -> (state, metrics)``: one optimizer update on ``batch``;
    metrics hold the loss, the gradient norm, the answer tokens and ``lr/<group>``, the learning
    rate of each of ``schedules`` ({lr group: schedule}) that this update applies.

    state: {"step", "trainable", "opt_state"}; ``step`` counts applied updates, as the
    optimizer's own count does (both stay put on a skipped step), so ``schedule(step)`` is the
    rate applied. With ``grad_accum`` = k > 1 the batch is split into k micro-batches
    (:func:`micro_batches`) run one after the other (``lax.scan``); their gradients are summed,
    each micro-batch's NLL divided by the answer tokens of the whole batch, so the update equals
    one on the whole batch. When the loss, the gradient or an updated param is not finite the
    returned state is the input state and ``metrics["applied"]`` is False. ``loss_chunk``: the
    tokens per row whose logits the loss holds at once (:func:`chunked_answer_nll_sum`).

    ``loss_average`` "tokens" (above: every answer token of the update weighs alike) or
    "per_device_batch" (the authors' trainers: the token mean of each group of ``group_rows``
    consecutive rows of the update's batch, averaged over its groups: :func:`group_weights`;
    under pmap the groups are formed in each device's rows, so ``group_rows`` must divide them).

    One gradient reduction per update: each device sums the gradients of its own rows over the
    k micro-batches, then the sums are reduced once.
    * ``axis_name`` (pmap): each device holds part of the batch; answer-token counts, losses and
      accumulated gradients are ``psum``-ed over that axis after the micro-batch scan.
    * ``mesh`` (the mesh the step is jitted on; trainer.Runner passes it): its axes are in
      context while tracing, so the model's activations stay split over the batch axes
      (:func:`parallel.constrain_rows`: XLA gathers fsdp-sharded weights, not the whole batch's
      rows). With pure data parallelism (:func:`data_parallel_mesh`) the gradient part runs
      under ``shard_map`` over the batch axes, as pmap does: one all-reduce per update, however
      many micro-batches (left to XLA's partitioner, the all-reduce sat inside the scan: one per
      micro-batch).
    * fsdp > 1 (or tensor > 1) is left to XLA: each micro-batch's gradients are reduce-scattered
      onto their param shards and accumulated there, k reductions per update. On purpose:
      reducing once would need each device to hold an unreduced full-size gradient of every
      trainable param across the micro-batches, fsdp x the sharded accumulator, which is the
      memory ZeRO-3 exists to save; and each micro-batch already all-gathers the params
      (forward and backward), so its reduce-scatter adds at most a third of the traffic fsdp
      moves anyway.
    """
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"loss_average {loss_average!r} is not one of {LOSS_AVERAGES}")
    if loss_average == "per_device_batch" and group_rows < 1:
        raise ValueError(f"loss_average per_device_batch needs group_rows >= 1 (got {group_rows})")
    loss = loss_fn(model, stage, loss_chunk)
    grad = jax.value_and_grad(loss)

    def weighed(batch, axis=None):
        """``batch`` with its rows' loss_weight (:func:`group_weights`), the groups formed in its
        rows and counted over ``axis`` (pmap) or in them."""
        rows = batch["loss_mask"].shape[0]
        if rows % group_rows:
            raise ValueError(f"loss groups of {group_rows} rows do not divide the {rows} rows "
                             f"{'of a device (pmap)' if axis else 'of the batch'} (optim.loss_group_rows)")
        groups = rows // group_rows if axis is None else jax.lax.psum(rows // group_rows, axis)
        return {**batch, "loss_weight": group_weights(batch["loss_mask"], group_rows, groups)}

    def gradients(trainable, frozen, batch, axis):
        """(answer tokens, loss, gradients) of the update, each device's sums over its rows and
        micro-batches reduced once over ``axis`` (None: one device, or XLA's partitioner)."""
        n_tokens = jnp.sum(batch["loss_mask"][:, 1:])
        if axis is not None:
            n_tokens = jax.lax.psum(n_tokens, axis)
        if loss_average == "per_device_batch" and "loss_weight" not in batch:  # pmap
            batch = weighed(batch, axis)
        divide = 1 if "loss_weight" in batch else n_tokens
        if grad_accum == 1:
            value, grads = grad(trainable, frozen, batch, divide)
        else:
            def accumulate(carry, micro):
                added = jax.tree_util.tree_map(jnp.add, carry, grad(trainable, frozen, micro, divide))
                return added, None
            zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, trainable))
            (value, grads), _ = jax.lax.scan(accumulate, zero, micro_batches(batch, grad_accum))
        if axis is not None:
            value, grads = jax.lax.psum((value, grads), axis)
        return n_tokens, value, grads

    if data_parallel_mesh(mesh):
        rows = parallel.BATCH[0]
        # check_vma=False: pmap's semantics, the params' gradients stay each device's own (with
        # the check, the transpose of the replicated params would psum them in every micro-batch)
        reduced = jax.shard_map(lambda t, f, b: gradients(t, f, b, rows), mesh=mesh,
                                in_specs=(P(), P(), P(rows)), out_specs=P(), check_vma=False)
    else:
        reduced = lambda t, f, b: gradients(t, f, b, axis_name)  # noqa: E731

    def update(state, frozen, batch):
        trainable = state["trainable"]
        if loss_average == "per_device_batch" and axis_name is None:  # the whole batch's groups
            batch = weighed(batch)
        n_tokens, value, grads = reduced(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        grad_norm = optax.global_norm(grads)
        new = {"step": state["step"] + 1, "trainable": optax.apply_updates(trainable, updates),
               "opt_state": opt_state}
        # a non-finite loss, gradient or updated param leaves the state as it was
        ok = jnp.isfinite(value) & jnp.isfinite(grad_norm) & all_finite(new["trainable"])
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
        metrics = {"loss": value, "grad_norm": grad_norm, "answer_tokens": n_tokens, "applied": ok,
                   **{f"lr/{g}": s(state["step"]) for g, s in schedules.items()}}
        return new, metrics

    if mesh is None:
        return update

    def step(state, frozen, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return update(state, frozen, batch)

    return step
