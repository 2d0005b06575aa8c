"""FocalNet as the backbone of dense prediction (detection, segmentation), as the official dense code has it.

The backbone is the classification FocalNet's stem and stages (built by ``FocalNet`` itself, same
parameter names) plus a LayerNorm ``norm{i}`` on the output of every stage listed in ``out_indices``;
the classifier's final norm and head are not part of it. Two behaviours differ from classification,
both from the official detection and segmentation backbones:

- Any input size works: the image is zero-padded on the right and bottom to a multiple of the patch
  size before the stem, and every stage output to even height and width before its downsampler, so
  the grids go ceil(H / 2) from stage to stage (100x76 -> 25x19 -> 13x10 -> 7x5 -> 4x3).
- The overlapping stem (``use_conv_embed``) has padding 3, not 2.

Weights come from an official dense checkpoint (``load_dense_checkpoint``: the ``backbone.*`` keys of
an mmdetection / mmsegmentation checkpoint, loaded strictly) or from ImageNet classification weights
(``init_from_classification``: what the official ``load_checkpoint`` does, depth-wise kernels
centre-padded to the larger dense windows and the gate rows of ``modulation.f`` expanded for new focal
levels, with a report of every added, dropped and reshaped tensor).
"""
import re
from os import PathLike
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .focalnet import FocalNet
from .pretrained import CheckpointError, convert_state_dict, extract_state_dict, read_state_file
from .state_fit import fit_problems

__all__ = ['FocalNetDense', 'build_dense_backbone', 'load_dense_checkpoint', 'init_from_classification',
           'dense_state_from_classification']

BlockId = Tuple[int, int]  # (stage, block within the stage)
StateDict = Dict[str, torch.Tensor]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW tensor on the right and bottom so that H and W are multiples of ``multiple``."""
    H, W = x.shape[-2:]
    pad_h, pad_w = -H % multiple, -W % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class FocalNetDense(nn.Module):
    """FocalNet backbone returning normalised per-stage maps (B, C_i, H_i, W_i) for ``out_indices``.

    The keyword arguments are the official dense backbone's (``embed_dim``, ``depths``,
    ``focal_levels``, ``focal_windows``, ``out_indices``, ``drop_path_rate``, ``use_checkpoint``, ...),
    with its defaults; the remaining ones are FocalNet's options for the larger releases.
    """

    def __init__(
            self,
            patch_size: int = 4,
            in_chans: int = 3,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            mlp_ratio: float = 4.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            patch_norm: bool = True,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            focal_levels: Union[int, Sequence[int]] = 2,
            focal_windows: Union[int, Sequence[int]] = 9,
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
        out_indices = tuple(int(i) for i in out_indices)
        bad = [i for i in out_indices if not 0 <= i < num_stages]
        if bad or not out_indices or len(set(out_indices)) != len(out_indices):
            raise ValueError(f'out_indices {list(out_indices)} must be distinct stage indices '
                             f'0..{num_stages - 1}')
        # The classification model builds the stem and the stages (names, drop-path rates, init);
        # its final norm and classifier are left behind.
        net = FocalNet(
            patch_size=patch_size, in_chans=in_chans, num_classes=0, embed_dim=embed_dim,
            depths=tuple(depths), mlp_ratio=mlp_ratio, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, patch_norm=patch_norm, focal_levels=focal_levels,
            focal_windows=focal_windows, focal_factors=focal_factors, use_conv_embed=use_conv_embed,
            use_layerscale=use_layerscale, layerscale_value=layerscale_value, use_postln=use_postln,
            use_postln_in_modulation=use_postln_in_modulation,
            normalize_modulator=normalize_modulator)
        self.patch_embed = net.patch_embed
        self.pos_drop = net.pos_drop
        self.layers = net.layers
        if use_conv_embed:
            # The dense code's overlapping stem pads 3 on each side where the classifier's pads 2
            # (same output size on inputs padded to a multiple of 4, shifted by one pixel).
            self.patch_embed.proj.padding = (3, 3)
        self.patch_size = patch_size
        self.out_indices = out_indices
        self.dims = [embed_dim * 2 ** i for i in range(num_stages)]
        # What detection and segmentation heads need to know about the outputs.
        self.out_channels = [self.dims[i] for i in out_indices]
        self.strides = [patch_size * 2 ** i for i in out_indices]
        for i in out_indices:
            norm = nn.LayerNorm(self.dims[i])  # PyTorch's init is the official one: weight 1, bias 0
            self.add_module(f'norm{i}', norm)
        self.grad_checkpointing = use_checkpoint

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The layer scales (norms and biases are excluded by shape)."""
        return {n for n, _ in self.named_parameters() if n.rsplit('.', 1)[-1] in ('gamma_1', 'gamma_2')}

    def _run(self, x: torch.Tensor, maps: Optional[Dict[BlockId, dict]] = None) -> List[torch.Tensor]:
        x = self.pos_drop(self.patch_embed(pad_to_multiple(x, self.patch_embed.proj.stride[0])))
        outs = []
        for s, stage in enumerate(self.layers):
            for b, block in enumerate(stage.blocks):
                if maps is not None and (s, b) in maps:
                    x = block(x, maps[(s, b)])
                elif self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            if s in self.out_indices:
                outs.append(getattr(self, f'norm{s}')(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = x.permute(0, 3, 1, 2)
                x = stage.downsample(pad_to_multiple(x, stage.downsample.proj.stride[0]))
        return outs

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One (B, C_i, H_i, W_i) map per entry of ``out_indices``, stride 4 * 2**i."""
        return self._run(x)

    def modulation_maps(self, x: torch.Tensor, blocks: Optional[Sequence[BlockId]] = None
                        ) -> Tuple[List[torch.Tensor], Dict[BlockId, Dict[str, torch.Tensor]]]:
        """The outputs and, per requested (stage, block) (default: every block), its gates
        (B, L + 1, H, W) and modulator h(ctx_all) (B, C, H, W)."""
        if blocks is None:
            blocks = [(s, b) for s, stage in enumerate(self.layers) for b in range(len(stage.blocks))]
        maps: Dict[BlockId, dict] = {}
        for s, b in blocks:
            if not (0 <= s < len(self.layers) and 0 <= b < len(self.layers[s].blocks)):
                raise IndexError(f'block {(s, b)} does not exist; depths are '
                                 f'{[len(st.blocks) for st in self.layers]}')
            maps[(s, b)] = {}
        return self._run(x, maps), maps


def build_dense_backbone(config, out_indices: Sequence[int] = (0, 1, 2, 3)) -> FocalNetDense:
    """The dense backbone that ``MODEL.FOCAL.*``, ``MODEL.DROP_RATE``, ``MODEL.DROP_PATH_RATE`` and
    ``TRAIN.USE_CHECKPOINT`` describe, exactly as ``models.build_model`` reads them."""
    from .registry import model_kwargs_from_config
    kwargs = model_kwargs_from_config(config)
    for key in ('img_size', 'num_classes'):
        kwargs.pop(key, None)
    return FocalNetDense(out_indices=tuple(out_indices), **kwargs)


# ---- weights -------------------------------------------------------------------------------------

def _mismatch_error(source: str, what: str, state: StateDict, target: StateDict,
                    extra_hint: str = '') -> CheckpointError:
    return CheckpointError(f'{source}: the {what} does not fit the backbone:\n  '
                           + '\n  '.join(fit_problems(state, target)) + extra_hint)


def _state_of(source: Union[str, PathLike, Mapping]) -> Tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, 'state dict'
    return read_state_file(source, 'cpu', mmap=True), str(source)


def load_dense_checkpoint(backbone: FocalNetDense, source: Union[str, PathLike, Mapping],
                          prefix: str = 'backbone.') -> dict:
    """Load the backbone of an official dense checkpoint (mmdetection / mmsegmentation, key layout
    ``backbone.*``; a bare backbone state dict works too) strictly.

    Every backbone tensor of the file must fit: a missing, unexpected or differently shaped key is a
    CheckpointError listing them. What the file holds besides the backbone (neck, heads) is not
    loaded; the report counts it per component: {'path', 'num_tensors', 'dropped': {name: count}}.
    """
    obj, name = _state_of(source)
    state = extract_state_dict(obj, name)
    if any(k.startswith(prefix) for k in state):
        dropped: Dict[str, int] = {}
        for k in state:
            if not k.startswith(prefix):
                component = k.split('.', 1)[0]
                dropped[component] = dropped.get(component, 0) + 1
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        dropped = {}
    target = backbone.state_dict()
    if set(state) != set(target) or any(state[k].shape != v.shape for k, v in target.items()):
        hint = ''
        norms_file = sorted(k.split('.')[0] for k in state if re.fullmatch(r'norm\d+\.weight', k))
        norms_model = sorted(f'norm{i}' for i in backbone.out_indices)
        if norms_file != norms_model:
            hint = (f'\n  (the file has output norms {norms_file}, the backbone {norms_model}: '
                    f'build it with the out_indices of the method the checkpoint was trained for)')
        raise _mismatch_error(name, 'dense checkpoint', state, target, hint)
    backbone.load_state_dict(state, strict=True)
    return {'path': name, 'num_tensors': len(state), 'dropped': dropped}


_FOCAL_KERNEL = re.compile(r'\.modulation\.focal_layers\.\d+\.0\.weight$')
_GATES = re.compile(r'\.modulation\.f\.(weight|bias)$')


def _centre(pretrained: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A depth-wise kernel centred in a zero kernel of ``shape`` (or its centre crop when larger)."""
    k_old, k_new = pretrained.shape[-1], shape[-1]
    if (k_new - k_old) % 2:
        raise CheckpointError(f'cannot centre a {k_old}x{k_old} kernel in a {k_new}x{k_new} one')
    if k_old > k_new:
        m = (k_old - k_new) // 2
        return pretrained[..., m:m + k_new, m:m + k_new].clone()
    out = pretrained.new_zeros(shape)
    m = (k_new - k_old) // 2
    out[..., m:m + k_old, m:m + k_old] = pretrained
    return out


def _expand_gates(pretrained: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Rows of ``modulation.f`` for more focal levels: query and context (the first 2C rows) and the
    global gate (the last row) stay; the pretrained level gates fill the first level rows; the new
    levels' gate rows are zero."""
    old_levels = pretrained.shape[0] - 2 * dim - 1
    out = pretrained.new_zeros(shape)
    out[:2 * dim] = pretrained[:2 * dim]
    out[-1] = pretrained[-1]
    out[2 * dim:2 * dim + old_levels] = pretrained[2 * dim:-1]
    return out


def dense_state_from_classification(state: StateDict, target: StateDict) -> Tuple[StateDict, dict]:
    """A classification state dict (official layout) adapted to a dense backbone's ``target`` state,
    as the official ``load_checkpoint`` adapts it, and what was done: (state to load, report with
    'added' (backbone keys the file lacks: they keep the backbone's init), 'dropped' (file keys the
    backbone lacks), 'padded' (kernels centre-padded or cropped), 'expanded' (gate rows grown))."""
    state = dict(state)
    padded, expanded = [], []
    for key, value in list(state.items()):
        if key not in target or value.shape == target[key].shape:
            continue
        if _FOCAL_KERNEL.search(key) and value.dim() == 4 and value.shape[:2] == target[key].shape[:2]:
            state[key] = _centre(value, target[key].shape)
            padded.append(f'{key} {list(value.shape)} -> {list(target[key].shape)}')
        elif _GATES.search(key):
            weight_key = key[:key.rindex('.')] + '.weight'
            dim = target[weight_key].shape[1]
            if weight_key not in state or state[weight_key].shape[1] != dim:
                continue  # another width: reported as a shape mismatch below
            if value.shape[0] > target[key].shape[0]:
                raise CheckpointError(f'{key}: the file has more focal levels than the backbone '
                                      f'({value.shape[0] - 2 * dim - 1} vs {target[key].shape[0] - 2 * dim - 1})')
            state[key] = _expand_gates(value, target[key].shape, dim)
            expanded.append(f'{key} {list(value.shape)} -> {list(target[key].shape)}')
    added = [k for k in target if k not in state]
    dropped = [k for k in state if k not in target]
    return ({k: v for k, v in state.items() if k in target},
            {'added': added, 'dropped': dropped, 'padded': padded, 'expanded': expanded})


# Keys a classification checkpoint may lack or add without anything being wrong: the dense output
# norms and the kernels of focal levels the classifier did not have; its final norm and classifier.
_MAY_ADD = re.compile(r'^norm\d+\.|\.modulation\.focal_layers\.\d+\.0\.weight$')
_MAY_DROP = re.compile(r'^(norm|head)\.')


def init_from_classification(backbone: FocalNetDense, source: Union[str, PathLike, Mapping]) -> dict:
    """Start a dense backbone from ImageNet classification weights (official, timm or HF layout), as
    the official ``FocalNet.init_weights(pretrained=...)`` does: 3x3 / 5x5 kernels centred in the dense
    9x9 / 11x11 ones, ``modulation.f`` grown for extra focal levels, the classifier's ``norm`` and
    ``head`` dropped, the output norms and any new level's kernels left at the backbone's init.

    Unlike the official non-strict load, anything else that does not fit (another width or depth) is
    a CheckpointError. Returns {'path', 'layout', 'added', 'dropped', 'padded', 'expanded'}.
    """
    obj, name = _state_of(source)
    try:
        state, layout = convert_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f'{name}: {e}') from None
    target = backbone.state_dict()
    state, report = dense_state_from_classification(state, target)
    bad_added = [k for k in report['added'] if not _MAY_ADD.search(k)]
    bad_dropped = [k for k in report['dropped'] if not _MAY_DROP.search(k)]
    bad_shape = [k for k, v in state.items() if v.shape != target[k].shape]
    if bad_added or bad_dropped or bad_shape:
        shown = {k: state[k] for k in bad_shape}
        shown.update({k: v for k, v in convert_state_dict(obj)[0].items() if k in bad_dropped})
        raise _mismatch_error(name, f'{layout}-layout classification checkpoint', shown,
                              {k: target[k] for k in bad_added + bad_shape})
    # The keys the file lacks keep the backbone's values; then every key is loaded, strictly.
    full = dict(target)
    full.update(state)
    backbone.load_state_dict(full, strict=True)
    return {'path': name, 'layout': layout, **report}
