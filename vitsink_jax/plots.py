"""PNG figures for the sink analysis (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from . import outputs, paths


class _Pyplot:
    """matplotlib.pyplot on the Agg backend, imported at the first figure: importing it costs
    about a second of every CLI start, and most runs draw nothing."""

    def __getattr__(self, name):
        import matplotlib

        if "pyplot" not in self.__dict__:
            matplotlib.use("Agg")
            import matplotlib.pyplot

            self.__dict__["pyplot"] = matplotlib.pyplot
        return getattr(self.__dict__["pyplot"], name)


plt = _Pyplot()


def _save(fig, path) -> Path:
    """Saves ``fig`` as ``path`` (its folder created; rendered in memory, then uploaded whole,
    for an object store; staged while a :func:`vitsink_jax.outputs.session` of its workdir is
    open, as every figure is a result) and closes it. Returns ``path``."""
    path = paths.path(path)
    target = paths.path(outputs.staged(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    if paths.is_remote(target):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=120, format=target.suffix[1:])
        target.write_bytes(buf.getvalue())
    else:
        fig.savefig(target, dpi=120)
    plt.close(fig)
    return path


def _whole_steps(n: int, most: int = 16) -> range:
    """Tick positions for ``n`` rows of whole units (layers): every row, or every k-th so that
    at most ``most`` ticks are drawn."""
    return range(0, n, -(-n // most))


def norm_histogram(norms: dict, tau: float, path) -> Path:
    """Histogram of visual-token norms over all images, with the fixed threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    allv = np.concatenate([np.ravel(v) for v in norms.values()])
    ax.hist(allv, bins=60, color="tab:blue", alpha=0.8)
    ax.axvline(tau, color="tab:red", ls="--", label=f"tau = {tau:g}")
    ax.set(xlabel="L2 norm of projector-input token", ylabel="tokens", yscale="log",
           title=f"ViT token norms ({len(norms)} images, {allv.size} tokens)")
    ax.legend()
    return _save(fig, path)


def _photo_panel(ax, shown) -> None:
    """The whole photo with the part the model sees outlined (``shown``: a
    :class:`~vitsink_jax.data.preprocess.ModelView`'s photo and box)."""
    photo, (left, top, right, bottom) = shown
    ax.imshow(photo)
    ax.add_patch(plt.Rectangle((left, top), right - left, bottom - top, fill=False, ec="yellow", lw=2,
                               ls="--"))
    ax.set_xlim(min(0, left), max(photo.shape[1], right))
    ax.set_ylim(max(photo.shape[0], bottom), min(0, top))
    ax.set_title("photo; dashed: what the model sees", fontsize=9)


def _patch_box(ax, patch: int, grid: int, w: int, h: int) -> None:
    r, c = divmod(int(patch), grid)
    ax.add_patch(plt.Rectangle((c * w / grid, r * h / grid), w / grid, h / grid, fill=False, ec="cyan", lw=2))


def sink_overlay(view: np.ndarray, sink: np.ndarray, norms: np.ndarray, grid: int, title: str,
                 path, photo: tuple | None = None) -> Path:
    """The model's view of an image (``view`` [S, S, 3]: the photo as preprocessed, so patch
    (r, c) of the ``grid`` x ``grid`` tokens lies at rows r*S/grid..), a norm heat map over it
    and the sink patches outlined; with ``photo`` = (the photo, the box of it the view shows),
    the photo with that box first."""
    fig, axes = plt.subplots(1, 3 if photo is not None else 2, figsize=(12 if photo is not None else 8, 4))
    if photo is not None:
        _photo_panel(axes[0], photo)
        axes = axes[1:]
    h, w = view.shape[:2]
    for ax in axes:
        ax.imshow(view)
    axes[1].imshow(norms.reshape(grid, grid), extent=(0, w, h, 0), alpha=0.55, cmap="magma")
    for idx in np.flatnonzero(sink):
        _patch_box(axes[1], idx, grid, w, h)
    axes[0].set_title(f"{title}: the model's input")
    axes[1].set_title(f"token norms, {int(sink.sum())} sink(s) outlined")
    for ax in fig.axes:
        ax.axis("off")
    return _save(fig, path)


def attention_by_bucket(bucket_mean: np.ndarray, edges: np.ndarray, path) -> Path:
    """F1: mean attention per visual token by norm bucket (columns) and LLM layer (rows)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(bucket_mean, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(edges) - 1), [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)],
                  rotation=45, fontsize=7)
    ax.set_yticks(_whole_steps(bucket_mean.shape[0]))
    ax.set(xlabel="ViT norm bucket", ylabel="LLM layer",
           title="attention received per visual token (mean over heads)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def dimension_profiles(profiles: dict, path) -> Path:
    """F3: |h[d]| / RMS(h) per hidden dim, averaged over layers, for each token group."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, prof in profiles.items():
        ax.plot(prof, label=name, lw=1)
    ax.set(xlabel="LLM hidden dimension", ylabel="mean |h[d]| / RMS(h)",
           title="hidden dimensions fired by each group of visual tokens")
    ax.legend(fontsize=8)
    return _save(fig, path)


def relevance_maps(view: np.ndarray, maps: dict, path, photo: tuple | None = None) -> Path:
    """F4: the model's view of the image (as in :func:`sink_overlay`; with ``photo``, the photo
    and the box it shows first), then one panel per target token with its relevance map
    (attention it receives from every patch, mean over heads) over the view; the target's patch
    is outlined."""
    first = 2 if photo is not None else 1
    fig, axes = plt.subplots(1, len(maps) + first, figsize=(3.2 * (len(maps) + first), 3.4))
    if photo is not None:
        _photo_panel(axes[0], photo)
    h, w = view.shape[:2]
    axes[first - 1].imshow(view)
    axes[first - 1].set_title("the model's input")
    for ax, (label, (grid_map, patch)) in zip(axes[first:], maps.items()):
        ax.imshow(view)
        ax.imshow(grid_map, extent=(0, w, h, 0), alpha=0.6, cmap="inferno")
        if patch >= 0:  # (a CLS target has no patch)
            _patch_box(ax, patch, grid_map.shape[0], w, h)
        ax.set_title(label, fontsize=9)
    for ax in axes:
        ax.axis("off")
    return _save(fig, path)


def pruning_curves(curves: dict, path) -> Path:
    """Accuracy (%) against visual tokens kept, one line per pruning method
    ({label: [(tokens kept, accuracy)]})."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, points in curves.items():
        kept, acc = zip(*sorted(points))
        ax.plot(kept, acc, marker="o", label=label)
    ax.set(xlabel="visual tokens kept", ylabel="accuracy (%)", title="token pruning")
    if curves:
        ax.legend()
    return _save(fig, path)


def tau_sweep(taus: list, accuracy: list, sinks: list, reference: float, adaptive, path) -> Path:
    """Threshold robustness: accuracy (%) and sinks per image against tau; the reference model's
    accuracy as a dotted line and the adaptive rule's (accuracy, sinks) as dashed lines
    (``adaptive`` None: left out; sink counts None, as for generated answers: no sink curve)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(taus, accuracy, marker="o", color="tab:blue", label="accuracy")
    ax.axhline(reference, color="tab:gray", ls=":", label="reference model")
    right = ax.twinx()
    if None not in sinks:  # counted only where items were scored by log-likelihood
        right.plot(taus, sinks, marker="s", color="tab:orange", label="sinks / image")
    if adaptive is not None:
        ax.axhline(adaptive[0], color="tab:blue", ls="--", label="adaptive rule")
        if adaptive[1] is not None:
            right.axhline(adaptive[1], color="tab:orange", ls="--")
    ax.set(xlabel="tau (L2 norm threshold)", ylabel="accuracy (%)", title="sink threshold sweep")
    right.set_ylabel("sinks per image")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    return _save(fig, path)
