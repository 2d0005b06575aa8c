"""Focal Modulation Networks (Yang, Li and Gao, 2022).

The module tree and parameter names follow the released checkpoints exactly, so that
``load_state_dict(released["model"])`` works strictly for every release. The computation keeps
activations in (B, H, W, C) order: linear layers act on the last dimension, and the depth-wise
convolutions see a channels-last view of the same memory instead of a permuted copy.

At any input size the classification model computes what the official classification code does:
the patch convolutions floor (a remainder of rows or columns that does not fill a patch is dropped),
nothing is padded. The dense-prediction backbones pad their inputs themselves (models/dense.py).

Every forward path is written so that ``torch.jit.script``, ``torch.fx`` symbolic tracing,
``torch.compile(fullgraph=True)`` and ``torch.export`` take it as it is: no Python branch looks at a
tensor's size, device or values (``pointwise`` decides its device path inside one function that fx
records as a call, and the fused CUDA aggregation is never entered while scripting or tracing).

Reads top-down: MLP, focal modulation, block, patch embedding, stage, model.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_

from .fused import fused_aggregate, fused_available

__all__ = ['FocalModulation', 'FocalNetBlock', 'PatchEmbed', 'FocalNetStage', 'FocalNet']

BlockId = Tuple[int, int]  # (stage index, block index within the stage)
BlockMaps = Dict[str, torch.Tensor]  # what one block records for modulation_maps: gates, modulator


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


# torch.fx records pointwise() as one call instead of tracing into its device test, so a traced
# graph keeps the fast path of whichever device it later runs on.
torch.fx.wrap('pointwise')


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
        ctx_all: Optional[torch.Tensor] = None
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            gate = gates[:, level:level + 1]
            if ctx_all is None:
                ctx_all = ctx * gate
            else:
                ctx_all = ctx_all.addcmul_(ctx, gate)
        ctx_global = self.act(ctx.mean((2, 3), keepdim=True))
        gate = gates[:, self.focal_level:]
        if ctx_all is None:
            ctx_all = ctx_global * gate
        else:
            ctx_all = ctx_all.addcmul_(ctx_global, gate)
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        return ctx_all

    @torch.jit.unused
    def _fused_aggregate(self, ctx: torch.Tensor, gates: torch.Tensor) -> Optional[torch.Tensor]:
        """``aggregate`` by the Triton kernels where they apply (reading the strided slice in place),
        else None. Never compiled by TorchScript."""
        if not (self.fused and fused_available(ctx)):
            return None
        return fused_aggregate(ctx, gates, [layer[0].weight for layer in self.focal_layers],
                               self.normalize_modulator)

    def modulate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, gates, modulator); gates (B, L + 1, H, W), modulator (B, H, W, C)."""
        C = self.dim
        q, ctx, gates = torch.split(pointwise(x, self.f.weight, self.f.bias),
                                    [C, C, self.focal_level + 1], dim=-1)
        gates = gates.permute(0, 3, 1, 2)
        ctx = ctx.permute(0, 3, 1, 2)
        ctx_all = None if torch.jit.is_scripting() else self._fused_aggregate(ctx, gates)
        if ctx_all is None:
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
    def _scale(x: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
        return x if gamma is None else x * gamma

    def forward(self, x: torch.Tensor, maps: Optional[BlockMaps] = None) -> torch.Tensor:
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

    Non-overlapping patches by default; ``use_conv_embed`` gives the overlapping stem (7x7 stride 4,
    padding 2) and downsamplers (3x3 stride 2, padding 1) of the large models. Nothing is padded
    beyond the convolution's own padding: as in the official classification model, rows and columns
    that do not fill a last patch are dropped (100x76 gives 25x19 tokens, then 12x9, 6x4, 3x2).
    Callers that want the dense backbones' ceil behaviour pad the input first.
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
        self.downsample: Optional[PatchEmbed] = None
        if out_dim is not None:
            self.downsample = PatchEmbed(2, dim, out_dim, use_conv_embed=use_conv_embed, is_stem=False)

    @torch.jit.unused
    def forward_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``index`` of this stage, recomputed in backward when gradient checkpointing is on."""
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_blocks(self, x: torch.Tensor, maps: Optional[Dict[int, BlockMaps]] = None) -> torch.Tensor:
        """The blocks on (B, H, W, C) tokens. ``maps`` (block index -> dict) asks blocks to record
        their gates and modulator (see FocalNet.modulation_maps)."""
        for i, block in enumerate(self.blocks):
            if maps is not None and i in maps:
                x = block(x, maps[i])
            elif self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = self.forward_block(i, x)
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


def _feature_blocks(depths: Sequence[int]) -> List[BlockId]:
    """The blocks whose outputs are the model's features (``feature_info``): the last block of every
    stage, or, for a single-stage (isotropic) model, every block, as timm does for ViTs."""
    if len(depths) == 1:
        return [(0, b) for b in range(depths[0])]
    return [(s, d - 1) for s, d in enumerate(depths)]


def default_out_indices(num_stages: int, depth: int) -> Tuple[int, ...]:
    """Features a feature extractor returns by default: every stage, or for an isotropic model the
    ends of the four quarters of its blocks (2, 5, 8, 11 of 12), the usual taps for dense heads."""
    if num_stages > 1:
        return tuple(range(num_stages))
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}))


def take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """(feature indices, largest) for timm's ``indices`` argument: None for all, an int n for the
    last n, or a list of indices (negative ones count from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f'indices={indices} asks for the last {indices} features; the model has '
                             f'{num_features} (1..{num_features})')
        chosen = list(range(num_features - indices, num_features))
    else:
        chosen = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise ValueError(f'feature index {i} does not exist; the model has {num_features} '
                                 f'features (0..{num_features - 1})')
            chosen.append(i % num_features)
        if not chosen:
            raise ValueError('indices is empty; ask for at least one feature')
    return chosen, max(chosen)


_FORMATS = ('NCHW', 'NHWC')
_POOLS = ('avg', '')


class FocalNet(nn.Module):
    """FocalNet for classification and as a backbone.

    Multi-stage models double the width at each of their stages (``embed_dim * 2**i``); a single
    stage with patch 16 gives the isotropic models. ``focal_levels`` and ``focal_windows`` are per
    stage (an int applies to all); level l of a stage uses a depth-wise kernel of
    ``focal_factors[i] * l + focal_windows[i]``. ``global_pool`` is 'avg' (the released models) or
    '' (no pooling: ``forward`` returns the (B, H, W, C) map, through the classifier if there is one).

    Carries timm's model interface: ``feature_info``, ``forward_intermediates``,
    ``prune_intermediate_layers``, ``group_matcher``, ``pretrained_cfg``, ``num_features``,
    ``head_hidden_size``, ``reset_classifier`` and ``output_fmt`` ('NHWC', the layout of
    ``forward_features``).
    """
    output_fmt = 'NHWC'
    __jit_unused_properties__ = ['default_cfg']

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
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
        if global_pool not in _POOLS:
            raise ValueError(f'global_pool {global_pool!r} is not supported; use "avg" or "" (none)')
        num_stages = len(depths)
        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        focal_levels = _per_stage(focal_levels, num_stages, 'focal_levels')
        focal_windows = _per_stage(focal_windows, num_stages, 'focal_windows')
        focal_factors = _per_stage(focal_factors, num_stages, 'focal_factors')
        self.img_size = img_size  # the training resolution; any size the strides allow works
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
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

        # The features timm's feature extractors and forward_intermediates() return: the output of
        # each listed block, before the downsampling that may follow it. 'module' names that block.
        self.feature_blocks = _feature_blocks(depths)
        self.feature_info = [
            dict(num_chs=dims[s], reduction=self.strides[s], module=f'layers.{s}.blocks.{b}')
            for s, b in self.feature_blocks]
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        # What the weights expect of their inputs (timm's pretrained_cfg); the registry adds the
        # release's name and files, models.build_model the config's evaluation transform.
        self.pretrained_cfg = dict(
            num_classes=num_classes, input_size=(in_chans, *size),
            pool_size=tuple(n // self.strides[-1] for n in size), crop_pct=0.875,
            interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
            first_conv='patch_embed.proj', classifier='head', fixed_input_size=False, license='mit')

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
    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg``."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict):
        self.pretrained_cfg = cfg

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay besides norms and biases: the layer scales."""
        return {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in ('gamma_1', 'gamma_2')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's format): the stem, then one
        group per block (per stage when ``coarse``); a downsampling joins the last block of its stage
        and the final norm the last block of the network; the classifier comes last."""
        return dict(
            stem=r'^patch_embed',
            blocks=[
                (r'^layers\.(\d+)', None),
                (r'^norm', (99999,)),
            ] if coarse else [
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^layers\.(\d+)\.downsample', (99999,)),
                (r'^norm', (99999,)),
            ])

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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A fresh classifier for ``num_classes`` (0: none, ``forward`` returns features); with
        ``global_pool`` '' the features are not pooled either."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f'global_pool {global_pool!r} is not supported; use "avg" or "" (none)')
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else None
            self.head = nn.Linear(self.num_features, num_classes,
                                  device=None if ref is None else ref.device,
                                  dtype=None if ref is None else ref.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

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

    # ---- forward ----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalised feature map, (B, H, W, C) (``output_fmt``)."""
        x = self.pos_drop(self.patch_embed(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean((1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature interface: the features listed in ``feature_info``.

        ``indices``: the last n features for an int, those listed (negative counts from the end), or
        all (None). ``norm`` applies the final norm to the features it fits (the last stage's; every
        block's in an isotropic model). ``stop_early`` stops after the last feature asked for.
        ``output_fmt`` 'NCHW' (views of the channels-last memory) or 'NHWC'. Returns
        ``(forward_features(x), features)``, or only the features with ``intermediates_only``.
        """
        if output_fmt not in _FORMATS:
            raise ValueError(f'output_fmt {output_fmt!r} is not supported; use one of {_FORMATS}')
        chosen, max_index = take_indices(len(self.feature_blocks), indices)
        wanted = {self.feature_blocks[i]: i for i in chosen}
        last = self.feature_blocks[max_index] if stop_early else None
        found: Dict[int, torch.Tensor] = {}

        x = self.pos_drop(self.patch_embed(x))
        done = False
        for s, stage in enumerate(self.layers):
            for b, block in enumerate(stage.blocks):
                x = stage.forward_block(b, x)
                if (s, b) in wanted:
                    index = wanted[(s, b)]
                    fits = self.feature_info[index]['num_chs'] == self.num_features
                    y = self.norm(x) if norm and fits else x
                    found[index] = y.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else y
                if (s, b) == last:
                    done = True
                    break
            if done:
                break
            x = stage.forward_downsample(x)
        intermediates = [found[i] for i in chosen]
        if intermediates_only:
            return intermediates
        if not done:  # ran to the end: x is what forward_features returns
            x = self.norm(x)
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop every block after the last feature in ``indices`` (and the downsampling after it);
        without the last stage the final norm and the classifier go too. Returns the feature indices."""
        chosen, max_index = take_indices(len(self.feature_blocks), indices)
        stage, block = self.feature_blocks[max_index]
        prune_end = max_index < len(self.feature_blocks) - 1
        self.layers = self.layers[:stage + 1]
        self.layers[stage].blocks = self.layers[stage].blocks[:block + 1]
        self.layers[stage].downsample = None
        self.feature_blocks = self.feature_blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage; meaningless once it is gone
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return chosen

    # ---- modulation maps --------------------------------------------------------------------------
    def _run_with_maps(self, x: torch.Tensor, maps: Dict[BlockId, BlockMaps]) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        for s, stage in enumerate(self.layers):
            stage_maps = {b: m for (si, b), m in maps.items() if si == s} or None
            x = stage.forward_downsample(stage.forward_blocks(x, stage_maps))
        return x

    @torch.jit.ignore
    def modulation_maps(self, x: torch.Tensor, blocks: Optional[Sequence[BlockId]] = None
                        ) -> Tuple[torch.Tensor, Dict[BlockId, Dict[str, torch.Tensor]]]:
        """Logits and, for each requested block, its gates (B, L + 1, H, W) and modulator (B, C, H, W).

        ``blocks`` holds (stage, block) pairs; negative indices count from the end, and the default is
        the last block of the network. Nothing is stored on the modules.
        """
        if blocks is None:
            blocks = [(-1, -1)]
        maps: Dict[BlockId, dict] = {self.resolve_block(block): {} for block in blocks}
        logits = self.forward_head(self.norm(self._run_with_maps(x, maps)))
        return logits, maps
