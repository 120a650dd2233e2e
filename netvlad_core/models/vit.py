"""Vision transformers (DINOv2, DINOv2 with registers, DINOv3) as dense feature extractors, built through timm.

A :class:`TransformerBackbone` wraps timm's own network (``VisionTransformer`` for DINOv2, ``Eva`` with rotary
position embeddings for DINOv3, created with ``dynamic_img_size=True``) and runs timm's own modules in timm's order:

    resize → patch_embed → _pos_embed (+ patch_drop) → norm_pre → blocks[0..N-1] → norm → split prefix / patch tokens

The dense output is the last block's patch tokens after the final norm as a ``C × H/p × W/p`` map (what
``forward_intermediates(x, indices=[depth - 1], norm=True, output_fmt='NCHW')`` returns), so NetVLAD, GeM/max/avg
and the k-means sampling see it as any CNN feature map; :meth:`TransformerBackbone.forward_with_cls` also returns the
CLS token (after the final norm) for heads that use it (NetVLAD-Linear).

**Input size.** Any size works. An input whose sides are not multiples of the patch size ``p`` is first resized
(bilinear) to the nearest multiples, ``floor(side / p + 1/2) · p`` (at least ``p``): 640×480 becomes 644×476 at
``p = 14`` and stays 640×480 at ``p = 16``; 224² and 322² are multiples of 14 and pass unchanged. The position
embedding (DINOv2's 37×37 grid of the 518-px pretraining) is resampled by timm to the token grid at every forward
(DINOv3 has rotary embeddings, computed for the grid).

**Units.** ``trainable_blocks`` counts transformer blocks (default 4, as SALAD and SuperPlace); the patch embedding,
the CLS/register tokens and the position embedding belong to the first block's unit, the final norm to the last's.

**The freeze boundary.** :meth:`TransformerBackbone.split_at_freeze_boundary` cuts the network before its first
trainable block: the frozen trunk maps images to the frozen blocks' output tokens ``(N, prefix + h·w, C)`` (prefix
and patch tokens, after the position embedding), the trainable tail runs the remaining blocks, the norm and the
split on them for the configured input size's grid (``input_size``, set by ``build_model``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NetVLADError
from .backbones import Backbone


def model_input_size(height: int, width: int, patch: int) -> tuple[int, int]:
    """The size a ``height`` × ``width`` input is resized to: each side to its nearest multiple of ``patch``
    (halves round up), at least one patch."""
    return tuple(max(patch, int(side / patch + 0.5) * patch) for side in (int(height), int(width)))


def transformer_units(body: nn.Module) -> list[list[str]]:
    """One unit per block: the parameters before the first block join block 0, those after the last (the final
    norm) join the last block."""
    depth = len(body.blocks)
    units: list[list[str]] = [[] for _ in range(depth)]
    seen_block = False
    for name, _ in body.named_parameters():
        if name.startswith("blocks."):
            units[int(name.split(".")[1])].append(name)
            seen_block = True
        else:
            units[-1 if seen_block else 0].append(name)
    return units


class TransformerBackbone(Backbone):
    """A timm ViT as a dense feature extractor: ``forward(images) -> (N, C, H'/p, W'/p)`` (``H' × W'`` the input
    resized to multiples of the patch size, see the module docstring); ``body`` is timm's network, so parameter
    names are timm's (``blocks.3.attn.qkv.weight`` …). ``input_size`` is the configured input (height, width),
    which fixes the token grid of the trainable tail that runs on cached tokens."""

    def __init__(self, body: nn.Module, *, name: str, out_channels: int, patch: int, trainable_blocks: int,
                 input_size: tuple[int, int] | None = None):
        self.input_size = tuple(input_size) if input_size is not None else None
        super().__init__(body, name=name, out_channels=out_channels, stride=patch, units=transformer_units(body),
                         trainable_blocks=trainable_blocks)

    @property
    def patch(self) -> int:
        return self.stride

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.body.num_prefix_tokens)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an input of ``height`` × ``width`` pixels."""
        h, w = model_input_size(height, width, self.patch)
        return h // self.patch, w // self.patch

    # timm's own modules, in timm's order (VisionTransformer.forward_intermediates / Eva.forward_intermediates)
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        size = model_input_size(images.shape[-2], images.shape[-1], self.patch)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        body = self.body
        x = body.patch_embed(images)
        if self._rotary:
            x, _ = body._pos_embed(x)  # Eva: the rotary embedding is recomputed for the grid by each run of blocks
        else:
            x = body.patch_drop(body._pos_embed(x))
        return body.norm_pre(x)

    @property
    def _rotary(self) -> bool:
        return getattr(self.body, "rope", None) is not None

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int, grid: tuple[int, int]) -> torch.Tensor:
        blocks = list(self.body.blocks)[start:stop]
        if not self._rotary:
            for block in blocks:
                x = block(x)
            return x
        rope = self.body.rope.get_embed(shape=list(grid))
        for block in blocks:
            x = block(x, rope=rope)
        return x

    def _finish(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body.norm(x)
        n, prefix = x.shape[0], self.num_prefix_tokens
        patches = x[:, prefix:]
        if patches.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{self.name}: {patches.shape[1]} patch tokens do not make a {grid[0]}×{grid[1]} grid")
        dense = patches.reshape(n, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        return dense, x[:, 0]

    def forward_with_cls(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dense map (N, C, h, w), CLS token (N, C))``, both after the final norm."""
        grid = self.grid(images.shape[-2], images.shape[-1])
        x = self._run_blocks(self._embed(images), 0, len(self.body.blocks), grid)
        return self._finish(x, grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_cls(images)[0]

    def fix_input_size(self, height: int, width: int) -> None:
        """Resample the position embedding once for ``height`` × ``width`` inputs (timm's ``set_input_size``, the
        same bicubic resampling the forward does), so that a traced forward at that size (ONNX export) has no
        interpolation of its own: timm's resampler is antialiased, which ONNX opset 17 cannot express. The network
        then gives the same output at that size, and should not be used at others (export a copy)."""
        self.body.set_input_size(img_size=model_input_size(height, width, self.patch))

    def split_at_freeze_boundary(self) -> tuple[nn.Module, nn.Module] | None:
        """``(frozen, trainable)``: images → the frozen blocks' output tokens (N, prefix + h·w, C), and those
        tokens → the dense map (``forward_with_cls`` gives the CLS token too), sharing this backbone's modules:
        ``trainable(frozen(x)) == self(x)`` for inputs of the configured ``input_size``. ``None`` when every block
        trains."""
        frozen_blocks = self.num_units - self.trainable_blocks
        if frozen_blocks == 0:
            return None
        if self.input_size is None:
            raise NetVLADError(f"backbone {self.name!r}: the trunk cache needs the model's input size")
        trunk = _TransformerTrunk(self, frozen_blocks)
        tail = _TransformerTail(self, frozen_blocks, self.grid(*self.input_size))
        n_params = sum(1 for _ in self.body.parameters())
        if any(p.requires_grad for p in trunk.parameters()) or \
                sum(1 for _ in trunk.parameters()) + sum(1 for _ in tail.parameters()) != n_params:
            return None  # not a clean cut (a layout this class does not know)
        return trunk, tail


class _TransformerTrunk(nn.Module):
    """Images → the output tokens of the first ``stop`` blocks. Registers exactly the modules and parameters it
    runs (the backbone's own, shared), so its state dict is the frozen trunk's weights."""

    def __init__(self, backbone: TransformerBackbone, stop: int):
        super().__init__()
        body = backbone.body
        self.patch_embed, self.norm_pre = body.patch_embed, body.norm_pre
        for name in ("cls_token", "reg_token", "pos_embed"):
            if getattr(body, name, None) is not None:
                setattr(self, name, getattr(body, name))
        if getattr(body, "rope", None) is not None:
            self.rope = body.rope
        self.blocks = nn.ModuleList(list(body.blocks)[:stop])
        self.stop = stop
        self._run: Callable = backbone._run_blocks  # bound methods of the backbone: not registered as a submodule
        self._embed: Callable = backbone._embed
        self._grid: Callable = backbone.grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self._embed(images), 0, self.stop, self._grid(images.shape[-2], images.shape[-1]))


class _TransformerTail(nn.Module):
    """The tokens after block ``start`` → the remaining blocks, the final norm, the dense map (and CLS token), for
    the token grid ``grid``."""

    def __init__(self, backbone: TransformerBackbone, start: int, grid: tuple[int, int]):
        super().__init__()
        body = backbone.body
        self.blocks = nn.ModuleList(list(body.blocks)[start:])
        self.norm = body.norm
        if getattr(body, "rope", None) is not None:
            self.rope = body.rope
        self.start, self.grid = start, tuple(grid)
        self._run: Callable = backbone._run_blocks
        self._finish: Callable = backbone._finish
        self._depth = len(body.blocks)

    def forward_with_cls(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish(self._run(tokens, self.start, self._depth, self.grid), self.grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_with_cls(tokens)[0]
