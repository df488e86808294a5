"""BAGEL's understanding tower: transformers' SigLIP encoder under the published key names.

The checkpoint stores the tower as ``vit_model.vision_model.{embeddings,encoder,post_layernorm}.*`` with the patch
embedding as a 2-D Linear [hidden, p*p*c] whose input order is (row-in-patch, col-in-patch, channel), 26 encoder
layers (the JSON says 27; BAGEL drops the last) and no pooling head.  transformers 5's ``SiglipVisionModel`` has
those children directly (no ``.vision_model``), so :class:`VitTower` holds it as ``vision_model`` and swaps its
Conv2d patch embedding for the Linear.

The forward differs from ``SiglipVisionModel.forward`` on purpose: BAGEL adds the learned position embedding of
the top-left sub-grid of its 70x70 table (row*70 + col) instead of all 4900 entries or a bicubic interpolation, so
any image whose sides are multiples of the patch size (up to 980 px) is read at its own resolution.
"""
from __future__ import annotations

import torch
from torch import nn

from r3_rl.policy.bagel.embeddings import patchify


class VitTower(nn.Module):
    def __init__(self, vit_config) -> None:
        super().__init__()
        from transformers import SiglipVisionModel

        self.patch_size = vit_config.patch_size
        self.vision_model = SiglipVisionModel(vit_config)
        patch_dim = vit_config.num_channels * vit_config.patch_size ** 2
        self.vision_model.embeddings.patch_embedding = nn.Linear(patch_dim, vit_config.hidden_size)

    def forward(self, pixels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """pixels [N, c, H, W] in [-1, 1] (one size for the batch) and their patches' flat ids in the position
        table (:func:`~r3_rl.policy.bagel.embeddings.grid_position_ids`) -> features [N, patches, vit_hidden]."""
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight
        patches = patchify(pixels.to(weight.dtype), self.patch_size)
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(position_ids)
        x = vm.encoder(inputs_embeds=x).last_hidden_state  # bidirectional inside each image, no mask needed
        return vm.post_layernorm(x)


def conv_patch_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """A Conv2d patch kernel [hidden, c, p, p] as BAGEL's Linear weight [hidden, p*p*c] ((kh, kw, c) order)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
