"""Weights for the segmentor: the released ADE20K checkpoints (mmsegmentation layout), and ImageNet
classification weights for the backbone.

The released files are mmsegmentation training checkpoints, ``{'meta', 'state_dict', 'optimizer'}``,
whose ``state_dict`` holds the backbone, the UPerNet head and the auxiliary FCN head. ``KEY_MAP``
below is the whole conversion: every key of such a file must start with one of its prefixes, which
is replaced by ours. The model keeps mmsegmentation's names (see segmentation/heads.py), so each row
maps a part to itself; a key outside the table, or a missing or misshapen tensor, is an error that
lists them.
"""
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from models.dense import init_from_classification
from models.pretrained import CheckpointError, extract_state_dict, read_state_file
from models.state_fit import fit_problems, listing

# (prefix in the released checkpoint, prefix in this codebase, what it is)
KEY_MAP: List[Tuple[str, str, str]] = [
    ('backbone.patch_embed.', 'backbone.patch_embed.', 'stem: 4x4 patch conv, LayerNorm'),
    ('backbone.layers.', 'backbone.layers.', 'stages: blocks (modulation, MLP), downsamplers'),
    ('backbone.norm', 'backbone.norm', 'LayerNorm of each output, norm0..norm3'),
    ('decode_head.psp_modules.', 'decode_head.psp_modules.', 'pyramid pooling: <i>.1 = conv block of scale i'),
    ('decode_head.bottleneck.', 'decode_head.bottleneck.', '3x3 conv block fusing the pooled maps'),
    ('decode_head.lateral_convs.', 'decode_head.lateral_convs.', '1x1 conv blocks of stages 0-2'),
    ('decode_head.fpn_convs.', 'decode_head.fpn_convs.', '3x3 conv blocks after the top-down sums'),
    ('decode_head.fpn_bottleneck.', 'decode_head.fpn_bottleneck.', '3x3 conv block fusing all levels'),
    ('decode_head.conv_seg.', 'decode_head.conv_seg.', '1x1 classifier'),
    ('auxiliary_head.convs.', 'auxiliary_head.convs.', 'FCN head: 3x3 conv block on stage 2'),
    ('auxiliary_head.conv_seg.', 'auxiliary_head.conv_seg.', 'its classifier'),
]
# Inside every conv block: mmcv ConvModule's ``conv`` (no bias) and ``bn`` (weight, bias, running
# statistics, num_batches_tracked).

def convert_official(state: Mapping[str, torch.Tensor], source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """A released (mmsegmentation) state dict renamed through KEY_MAP; keys outside it are an error."""
    out, unknown = {}, []
    for key, value in state.items():
        for theirs, ours, _ in KEY_MAP:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f'{source}: not an UPerNet checkpoint of the released layout: '
                              + f'{len(unknown)} keys outside its parts (backbone, decode_head, auxiliary_head):\n    '
                              + listing(unknown, sep='\n    '))
    return out


def is_segmentor_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is a whole segmentor's (rather than an ImageNet classifier's)."""
    return any(k.startswith('decode_head.') for k in state)


def load_segmentor_weights(model: nn.Module, path: str) -> dict:
    """Load a released ADE20K checkpoint, or a state dict saved from this codebase's segmentor,
    strictly. Batch-norm counters (``num_batches_tracked``), which some files omit, keep the model's.
    Returns {'path', 'num_tensors'}."""
    state = convert_official(extract_state_dict(read_state_file(path), path), path)
    target = model.state_dict()
    problems = fit_problems(state, target, may_lack=lambda key: key.endswith('num_batches_tracked'))
    if problems:
        hint = ''
        if any(k.startswith('decode_head.conv_seg.') and k in state and state[k].shape != v.shape
               for k, v in target.items()):
            hint = ('\n  (the classifier has another number of classes: set MODEL.NUM_CLASSES to the '
                    'checkpoint\'s)')
        raise CheckpointError(f'{path}: the checkpoint does not fit the segmentor:\n  '
                              + '\n  '.join(problems) + hint)
    full = dict(target)
    full.update(state)
    model.load_state_dict(full, strict=True)
    return {'path': str(path), 'num_tensors': len(state)}


def init_from_pretrained(model: nn.Module, path: str) -> str:
    """``--pretrained``: a whole segmentor (released ADE20K checkpoint), or ImageNet classification
    weights for the backbone, adapted as the official code does (models.dense.init_from_classification).
    Returns a line for the log."""
    state = extract_state_dict(read_state_file(path, mmap=True), path)
    if is_segmentor_state(state) or any(k.startswith('backbone.') for k in state):
        report = load_segmentor_weights(model, path)
        return f'loaded the segmentor from {path} ({report["num_tensors"]} tensors)'
    report = init_from_classification(model.backbone, path)
    notes = [f'{len(report[k])} {k}' for k in ('padded', 'expanded', 'added', 'dropped') if report[k]]
    return (f'initialised the backbone from {report["layout"]}-layout classification weights {path}'
            + (f' ({", ".join(notes)})' if notes else '') + '; the heads keep their initialisation')
