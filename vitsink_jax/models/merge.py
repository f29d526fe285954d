"""Visual tokens that each merge a k x k window of ViT patch tokens (Gemma 3's average pool,
InternVL's pixel shuffle): the windows, and the sink features read on the ViT tokens.

A merged visual token's sink feature is the largest-norm ViT token of its window, so under the
threshold rule it is a sink exactly when it holds a ViT sink, every per-visual-token analysis
(norms, sink masks, sink-to-the-front) runs unchanged on it, and ``vision_token_index`` says
which tower token it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_type_ids(name: str, type_ids, input_ids, image_token_index: int) -> None:
    """A processor's token types [B, T] (1 on image tokens, 0 on text) checked against the image
    tokens of input_ids [B, T], which the model reads them from; a ValueError naming ``name``
    when they disagree. None or traced arrays are not checked."""
    if type_ids is None or isinstance(type_ids, jax.core.Tracer) or isinstance(input_ids, jax.core.Tracer):
        return
    marked, image = np.asarray(type_ids) == 1, np.asarray(input_ids) == image_token_index
    if marked.shape != image.shape or not np.array_equal(marked, image):
        raise ValueError(f"{name} {marked.shape} marks {int(marked.sum())} image token(s) where "
                         f"input_ids {image.shape} hold {int(image.sum())} (id {image_token_index})")


def pool_windows(tokens, grid: tuple, k: int):
    """Patch tokens [N, rows k * cols k, E] in row-major order -> [N, rows * cols, k * k, E]: for
    each cell of the ``grid`` = (rows, cols) of k x k windows, its k * k tokens (row-major inside)."""
    (rows, cols), (n, _, e) = grid, tokens.shape
    x = tokens.reshape(n, rows, k, cols, k, e).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, rows * cols, k * k, e)


def window_token_index(local, grid: tuple, k: int):
    """[N, P] index inside each k x k window (row-major) -> the patch index over the full
    (rows k) x (cols k) patch grid (row-major); ``grid`` = (rows, cols) of windows."""
    rows, cols = grid
    cell = jnp.arange(rows * cols)
    row = (cell // cols)[None] * k + local // k
    col = (cell % cols)[None] * k + local % k
    return (row * cols * k + col).astype(jnp.int32)


class MergedTokens:
    """Mixin of an LVLM (before :class:`~vitsink_jax.models.lvlm.LlavaForConditionalGeneration`
    in its bases) whose config has ``token_grid`` (visual tokens per side) and ``pool`` (k).
    The subclass says which ViT patch tokens [N, rows k * cols k, E] the norms are read on
    (:meth:`sink_tokens`; rows x cols visual tokens, :meth:`token_grid_of`) and what the
    projector reads (``projector_input``)."""

    merges_vit_tokens = True  # no single ViT token's [CLS] attention ranks a visual token

    def sink_tokens(self, vout):
        raise NotImplementedError

    def token_grid_of(self, vout) -> tuple:
        """(rows, cols) of visual tokens of the images in ``vout`` (the config's square grid)."""
        del vout
        return (self.config.token_grid,) * 2

    def _windows(self, tokens, vout):
        return pool_windows(tokens, self.token_grid_of(vout), self.config.pool)

    def _loudest(self, vout):
        """(windows [N, P, k * k, E] of the sink tokens, per visual token the index inside its
        window of the largest-norm one [N, P])."""
        windows = self._windows(self.sink_tokens(vout), vout)
        return windows, jnp.argmax(jnp.sum(jnp.square(windows.astype(jnp.float32)), -1), axis=-1)

    def vision_features(self, pixel_values, output_attentions: bool = False):
        """pixel_values [N, C, H, W] -> (per visual token the largest-norm ViT token of its
        window [N, P, E], VisionOutput)."""
        vout = self.vision_tower(pixel_values, output_hidden_states=True,
                                 output_attentions=output_attentions)
        windows, loud = self._loudest(vout)
        return jnp.take_along_axis(windows, loud[..., None, None], axis=2)[:, :, 0], vout

    def vision_token_index(self, selected, vout):
        del selected
        c = self.config
        return window_token_index(self._loudest(vout)[1], self.token_grid_of(vout), c.pool) + \
            c.vision.prefix_tokens
