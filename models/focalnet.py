"""Focal Modulation Networks (Yang, Li and Gao, 2022).

The module tree and parameter names follow the released checkpoints exactly, so that
``load_state_dict(released["model"])`` works strictly for every release. The computation keeps
activations in (B, H, W, C) order: linear layers act on the last dimension, and the depth-wise
convolutions see a channels-last view of the same memory instead of a permuted copy.

Reads top-down: MLP, focal modulation, block, patch embedding, stage, model.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, trunc_normal_

from .fused import fused_aggregate, fused_available

__all__ = ['FocalModulation', 'FocalNetBlock', 'PatchEmbed', 'FocalNetStage', 'FocalNet']

BlockId = Tuple[int, int]  # (stage index, block index within the stage)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A linear layer over the channels of a (B, H, W, C) tensor.

    On the CPU it runs as a 1x1 convolution over the channels-last view of the same memory: oneDNN's
    convolution is faster there than the BLAS matrix product behind F.linear, forward and backward
    (1.5-1.7x for the whole model; see benchmarks/). Elsewhere F.linear, which cuBLAS serves best.
    """
    # Through a (out, in) view, the gradient of a 1x1 convolution's weight comes back with the
    # default strides, as DistributedDataParallel expects, instead of oneDNN's channels-last ones.
    weight = weight.flatten(1)
    if x.device.type != 'cpu' or x.dim() != 4:
        return F.linear(x, weight, bias)
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop(self.act(pointwise(x, self.fc1.weight, self.fc1.bias)))
        return self.drop(pointwise(x, self.fc2.weight, self.fc2.bias))


class FocalModulation(nn.Module):
    """proj(q * h(sum_l gate_l * ctx_l + gate_L * global)) on a (B, H, W, C) tensor."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, focal_factor: int = 2,
                 proj_drop: float = 0., use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False):
        super().__init__()
        self.dim = dim
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.kernel_sizes = [focal_factor * k + focal_window for k in range(focal_level)]

        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        # A 1x1 convolution in the released weights; like the linear layers it is applied by
        # pointwise() to the (B, H, W, C) tensor, the same arithmetic without a layout change.
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False),
                nn.GELU(),
            )
            for k in self.kernel_sizes
        )
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)
        # On CUDA with FOCALNET_FUSED=1, modulate() aggregates with the Triton kernels of
        # models/fused.py; aggregate() is the plain reference, and the default path.
        # FocalNet.set_fused_aggregation(False) keeps a model on the plain path.
        self.fused = True

    def aggregate(self, ctx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Gated hierarchical context: ctx (B, C, H, W) and gates (B, L + 1, H, W), both NCHW views."""
        # The running sum is updated in place (one pass per term): backward needs none of its values.
        ctx_all = None
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            gate = gates[:, level:level + 1]
            ctx_all = ctx * gate if ctx_all is None else ctx_all.addcmul_(ctx, gate)
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
        gate = gates[:, self.focal_level:]
        ctx_all = ctx_global * gate if ctx_all is None else ctx_all.addcmul_(ctx_global, gate)
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        return ctx_all

    def modulate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, gates, modulator); gates (B, L + 1, H, W), modulator (B, H, W, C)."""
        C = x.shape[-1]
        q, ctx, gates = torch.split(pointwise(x, self.f.weight, self.f.bias),
                                    (C, C, self.focal_level + 1), dim=-1)
        gates = gates.permute(0, 3, 1, 2)
        ctx = ctx.permute(0, 3, 1, 2)
        if self.fused and fused_available(ctx):
            # Reads the strided slice in place.
            ctx_all = fused_aggregate(ctx, gates, [layer[0].weight for layer in self.focal_layers],
                                      self.normalize_modulator)
        else:
            # channels_last keeps the NCHW view over (B, H, W, C) memory, so the depth-wise
            # convolutions need no transposed copy.
            ctx_all = self.aggregate(ctx.contiguous(memory_format=torch.channels_last), gates)
        ctx_all = ctx_all.permute(0, 2, 3, 1)
        modulator = pointwise(ctx_all, self.h.weight, self.h.bias)
        out = q * modulator
        if hasattr(self, 'ln'):
            out = self.ln(out)
        out = self.proj_drop(pointwise(out, self.proj.weight, self.proj.bias))
        return out, gates, modulator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modulate(x)[0]


class FocalNetBlock(nn.Module):
    """Pre-norm (or post-norm) residual block: focal modulation, then an MLP; (B, H, W, C) in and out."""

    def __init__(self, dim: int, focal_level: int, focal_window: int, mlp_ratio: float = 4.,
                 drop: float = 0., drop_path: float = 0., use_layerscale: bool = False,
                 layerscale_value: float = 1e-4, use_postln: bool = False,
                 use_postln_in_modulation: bool = False, normalize_modulator: bool = False,
                 focal_factor: int = 2):
        super().__init__()
        # Registered first so the state dict lists them where the released checkpoints do.
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim, focal_level, focal_window, focal_factor=focal_factor, proj_drop=drop,
            use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    @staticmethod
    def _scale(x, gamma):
        return x if gamma is None else x * gamma

    def forward(self, x: torch.Tensor, maps: Optional[dict] = None) -> torch.Tensor:
        if self.use_postln:
            y, gates, modulator = self.modulation.modulate(x)
            y = self.norm1(y)
        else:
            y, gates, modulator = self.modulation.modulate(self.norm1(x))
        if maps is not None:
            maps['gates'] = gates
            maps['modulator'] = modulator.permute(0, 3, 1, 2)
        x = x + self.drop_path(self._scale(y, self.gamma_1))
        y = self.norm2(self.mlp(x)) if self.use_postln else self.mlp(self.norm2(x))
        return x + self.drop_path(self._scale(y, self.gamma_2))


class PatchEmbed(nn.Module):
    """Image (or NCHW feature map) to (B, H', W', C) tokens.

    Non-overlapping patches by default; ``use_conv_embed`` gives the overlapping stem (7x7 stride 4)
    and downsamplers (3x3 stride 2) of the large models. Inputs are zero-padded on the right and
    bottom to a multiple of the patch size, as the released models do.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool = False,
                 is_stem: bool = True, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        if use_conv_embed:
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel, stride, padding = patch_size, patch_size, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        # A channels-last input gives a channels-last output, whose (B, H, W, C) view is contiguous
        # for the norm (a no-op for the downsamplers, whose input already is).
        x = self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class FocalNetStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) a 2x downsampling to the next width."""

    def __init__(self, dim: int, out_dim: Optional[int], focal_level: int, focal_window: int,
                 drop_path: Sequence[float], use_conv_embed: bool = False, **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        # One block per drop-path rate: the list's length is the stage's depth.
        self.blocks = nn.ModuleList(
            FocalNetBlock(dim, focal_level, focal_window, drop_path=dp, **block_kwargs)
            for dp in drop_path)
        self.downsample = None
        if out_dim is not None:
            self.downsample = PatchEmbed(2, dim, out_dim, use_conv_embed=use_conv_embed, is_stem=False)

    def forward_blocks(self, x: torch.Tensor, maps: Optional[Dict[int, dict]] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if maps is not None and i in maps:
                x = block(x, maps[i])
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        return self.downsample(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_downsample(self.forward_blocks(x))


def _per_stage(value, num_stages: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * num_stages
    value = list(value)
    if len(value) != num_stages:
        raise ValueError(f'{name} has {len(value)} entries, but the model has {num_stages} stages')
    return value


class FocalNet(nn.Module):
    """FocalNet for classification and as a backbone.

    Multi-stage models double the width at each of their stages (``embed_dim * 2**i``); a single
    stage with patch 16 gives the isotropic models. ``focal_levels`` and ``focal_windows`` are per
    stage (an int applies to all); level l of a stage uses a depth-wise kernel of
    ``focal_factors[i] * l + focal_windows[i]``.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            patch_norm: bool = True,
            focal_levels: Union[int, Sequence[int]] = 2,
            focal_windows: Union[int, Sequence[int]] = 3,
            focal_factors: Union[int, Sequence[int]] = 2,
            use_conv_embed: bool = False,
            use_layerscale: bool = False,
            layerscale_value: float = 1e-4,
            use_postln: bool = False,
            use_postln_in_modulation: bool = False,
            normalize_modulator: bool = False,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        focal_levels = _per_stage(focal_levels, num_stages, 'focal_levels')
        focal_windows = _per_stage(focal_windows, num_stages, 'focal_windows')
        focal_factors = _per_stage(focal_factors, num_stages, 'focal_factors')
        self.img_size = img_size  # the training resolution; any size the strides allow works
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.dims = dims
        # Total stride at the input of each stage (the conv stem also reduces by 4).
        self.strides = [patch_size * 2 ** i for i in range(num_stages)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, dims[0], use_conv_embed=use_conv_embed,
                                      is_stem=True, norm=patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly with the block index over the whole network.
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(FocalNetStage(
                dims[i], dims[i + 1] if i < num_stages - 1 else None,
                focal_levels[i], focal_windows[i], dpr[start:start + depths[i]],
                use_conv_embed=use_conv_embed, mlp_ratio=mlp_ratio, drop=drop_rate,
                use_layerscale=use_layerscale, layerscale_value=layerscale_value,
                use_postln=use_postln, use_postln_in_modulation=use_postln_in_modulation,
                normalize_modulator=normalize_modulator, focal_factor=focal_factors[i]))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(m):
        # Convolutions keep PyTorch's default init, as in the released training code.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm-style API -------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay besides norms and biases: the layer scales."""
        return {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in ('gamma_1', 'gamma_2')}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_aggregation(self, enable: bool = True):
        """Whether CUDA runs may use the Triton context aggregation (models/fused.py; FOCALNET_FUSED=1)."""
        for module in self.modules():
            if isinstance(module, FocalModulation):
                module.fused = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def resolve_block(self, block: BlockId) -> BlockId:
        """(stage, block) with negative indices counted from the end; IndexError names a bad index."""
        stage, index = block
        n_stages = len(self.layers)
        if not -n_stages <= stage < n_stages:
            raise IndexError(f'stage {stage} does not exist; the model has {n_stages} stages '
                             f'(0..{n_stages - 1})')
        stage %= n_stages
        depth = len(self.layers[stage].blocks)
        if not -depth <= index < depth:
            raise IndexError(f'block {index} does not exist; stage {stage} has {depth} blocks '
                             f'(0..{depth - 1})')
        return stage, index % depth

    def block_ids(self) -> List[BlockId]:
        return [(s, b) for s, stage in enumerate(self.layers) for b in range(len(stage.blocks))]

    def _run(self, x: torch.Tensor, maps: Optional[Dict[BlockId, dict]] = None,
             stage_outputs: Optional[list] = None) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for s, stage in enumerate(self.layers):
            stage_maps = None
            if maps:
                stage_maps = {b: m for (si, b), m in maps.items() if si == s} or None
            x = stage.forward_blocks(x, stage_maps)
            if stage_outputs is not None:
                stage_outputs.append(x)
            x = stage.forward_downsample(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised feature map, (B, H, W, C)."""
        return self.norm(self._run(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Per-stage feature maps (B, C_i, H_i, W_i) before each downsampling, for dense prediction."""
        outs: list = []
        self._run(x, stage_outputs=outs)
        indices = range(len(outs)) if indices is None else indices
        return [outs[i].permute(0, 3, 1, 2) for i in indices]

    def modulation_maps(self, x: torch.Tensor, blocks: Optional[Sequence[BlockId]] = None
                        ) -> Tuple[torch.Tensor, Dict[BlockId, Dict[str, torch.Tensor]]]:
        """Logits and, for each requested block, its gates (B, L + 1, H, W) and modulator (B, C, H, W).

        ``blocks`` holds (stage, block) pairs; negative indices count from the end, and the default is
        the last block of the network. Nothing is stored on the modules.
        """
        if blocks is None:
            blocks = [(-1, -1)]
        maps: Dict[BlockId, dict] = {self.resolve_block(block): {} for block in blocks}
        logits = self.forward_head(self.norm(self._run(x, maps=maps)))
        return logits, maps
