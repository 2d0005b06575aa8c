"""Released FocalNet weights: read them safely, recognise their layout, load them strictly.

Three layouts are in circulation and all load into ``FocalNet``, whose parameter names are the
official release's:

- ``official``: the official repository's checkpoints, a training checkpoint ``{'model': ...}`` or a
  bare state dict.
- ``timm``: ``timm.models.focalnet.FocalNet``. Its stem is ``stem``, each downsampling sits at the
  start of the *next* stage, the 1x1 projections are Conv2d weights ``[out, in, 1, 1]``, layer scales
  are ``ls1.gamma``/``ls2.gamma``, post-norms ``norm1_post``/``norm2_post``, the modulation's norm is
  ``norm`` and the classifier ``head.fc``.
- ``hf``: HF transformers ``FocalNetForImageClassification`` / ``FocalNetBackbone`` (prefix
  ``focalnet.``) or a bare ``FocalNetModel`` (no prefix, no classifier).

Files are read with ``torch.load(weights_only=True)`` or safetensors, so a file cannot run code on
loading: a pickle that needs anything beyond tensors and plain containers is refused, naming what it
asked for.
"""
import json
import pickle
import re
from collections import OrderedDict
from os import PathLike
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .state_fit import listing

__all__ = ['CheckpointError', 'read_state_file', 'extract_state_dict', 'detect_layout',
           'convert_state_dict', 'to_timm', 'to_hf', 'adapt_input_conv', 'load_pretrained', 'LAYOUTS']

LAYOUTS = ('official', 'timm', 'hf')
StateDict = Dict[str, torch.Tensor]
_ITEM = '\n    '


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; the message says which keys."""


# ---- reading files ---------------------------------------------------------------------------------

class _Namespace:
    """Stands in for argparse.Namespace: its attributes are restored as data, nothing else runs."""


# Training checkpoints carry their settings: the official code its yacs config, timm's train.py its
# argparse namespace. The weights-only unpickler rebuilds them as these inert stand-ins (a CfgNode as
# the plain OrderedDict of its items), so that no yacs or argparse code runs and they do not block
# the weights.
_DATA_ONLY_GLOBALS = [(OrderedDict, 'yacs.config.CfgNode'), (_Namespace, 'argparse.Namespace')]


def _file_kind(path: Path) -> str:
    with open(path, 'rb') as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f'{path}: the file is empty')
    if head.startswith(b'PK\x03\x04'):
        return 'torch-zip'
    if head.startswith(b'\x80'):  # a pickle protocol opcode: torch's legacy format
        return 'torch-legacy'
    if len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < 100_000_000:
        return 'safetensors'
    raise CheckpointError(f'{path}: not a PyTorch checkpoint or a safetensors file '
                          f'(it starts with {head[:8]!r})')


def _refusal(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    found = re.search(r'GLOBAL ([\w.]+)', text)  # torch names the global it would have imported
    if found:
        what = f'the Python global {found.group(1)}'
    else:
        found = re.search(r'(Trying to [^\n]+|Can only [^\n]+|Unsupported [^\n]+)', text)
        what = found.group(1).strip() if found else 'objects torch does not allow'
    return CheckpointError(
        f'{path}: refused to load: the file holds Python objects beyond tensors and plain containers '
        f'({what}); a weights-only load does not build such objects, since unpickling them can run '
        f'arbitrary code, and nothing in the file was executed. If you '
        f'made the file yourself and trust it, save its state dict as plain tensors (torch.save of '
        f'the state dict, or safetensors) and load that.')


def read_state_file(path: Union[str, PathLike], map_location='cpu', *, mmap: bool = False) -> Mapping:
    """The contents of a .pth/.pt/.bin (torch) or .safetensors file, read without running any code.

    A directory written by HF ``save_pretrained`` is accepted too (its model.safetensors or
    pytorch_model.bin). The format is recognised from the file's first bytes, not its suffix.
    ``mmap=True`` maps a torch file's tensors instead of reading them; only for tensors that are
    copied and dropped at once, since they stay tied to the file.
    """
    path = Path(path)
    if path.is_dir():
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if (path / name).is_file():
                return read_state_file(path / name, map_location, mmap=mmap)
            if (path / f'{name}.index.json').is_file():
                return _read_shards(path / f'{name}.index.json', map_location, mmap)
        raise CheckpointError(f'{path}: a directory without model.safetensors or pytorch_model.bin')
    if not path.is_file():
        raise CheckpointError(f'{path}: checkpoint file not found')
    try:
        kind = _file_kind(path)
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read the file: {e}') from None

    if kind == 'safetensors':
        from safetensors.torch import load_file
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else 'cpu'
        try:
            return load_file(str(path), device=device)
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise CheckpointError(f'{path}: cannot read the safetensors file (truncated or '
                                  f'damaged?): {e}') from None
    try:
        with torch.serialization.safe_globals(_DATA_ONLY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and kind == 'torch-zip')
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:  # torch reports damaged files as RuntimeError, EOFError, ...
        raise CheckpointError(f'{path}: cannot read the checkpoint (truncated or damaged?): '
                              f'{type(e).__name__}: {e}') from None


def _read_shards(index: Path, map_location, mmap: bool) -> Dict[str, torch.Tensor]:
    """The tensors of a sharded HF checkpoint, from the files its index names."""
    try:
        weight_map = json.loads(index.read_text())['weight_map']
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f'{index}: not a readable shard index: {e}') from None
    state: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_state_file(index.parent / shard, map_location, mmap=mmap))
    return state


def extract_state_dict(obj, source: str = 'checkpoint') -> StateDict:
    """The tensors of a training checkpoint (its 'model', else 'state_dict' entry) or a bare state dict.

    A 'module.' (DistributedDataParallel) or '_orig_mod.' (torch.compile) prefix shared by every key
    is removed.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{source}: holds a {type(obj).__name__}, not a state dict')
    for entry in ('model', 'state_dict'):
        if isinstance(obj.get(entry), Mapping):
            obj = obj[entry]
            break
    if not obj:
        raise CheckpointError(f'{source}: the state dict is empty')
    not_tensors = [f'{k} ({type(v).__name__})' for k, v in obj.items()
                   if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'{source}: {len(not_tensors)} entries are not tensors, so this is not a '
                              f'state dict: {listing(not_tensors)}')
    state = dict(obj)
    for prefix in ('module.', '_orig_mod.'):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ---- layouts ---------------------------------------------------------------------------------------

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]


def _shift_stage(offset: int) -> Callable[[re.Match], str]:
    return lambda m: f'layers.{int(m.group(1)) + offset}.downsample.'


_TIMM_TO_OFFICIAL: List[Rule] = [
    (r'^stem\.', 'patch_embed.'),
    (r'^layers\.([1-9]\d*)\.downsample\.', _shift_stage(-1)),
    (r'\.ls([12])\.gamma$', r'.gamma_\1'),
    (r'\.norm([12])_post\.', r'.norm\1.'),
    (r'\.modulation\.norm\.', '.modulation.ln.'),
    (r'^head\.fc\.', 'head.'),
]
_OFFICIAL_TO_TIMM: List[Rule] = [
    (r'^patch_embed\.', 'stem.'),
    (r'^layers\.(\d+)\.downsample\.', _shift_stage(+1)),
    (r'\.gamma_([12])$', r'.ls\1.gamma'),
    (r'\.modulation\.ln\.', '.modulation.norm.'),
    (r'^head\.', 'head.fc.'),
]
_OFFICIAL_TO_TIMM_POSTLN: List[Rule] = [(r'(\.blocks\.\d+)\.norm([12])\.', r'\1.norm\2_post.')]
_HF_TO_OFFICIAL: List[Rule] = [
    (r'^focalnet\.', ''),
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^embeddings\.norm\.', 'patch_embed.norm.'),
    (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.', r'layers.\1.blocks.\2.'),
    (r'^encoder\.stages\.(\d+)\.downsample\.projection\.', r'layers.\1.downsample.proj.'),
    (r'^encoder\.stages\.(\d+)\.downsample\.norm\.', r'layers.\1.downsample.norm.'),
    (r'\.modulation\.projection_in\.', '.modulation.f.'),
    (r'\.modulation\.projection_context\.', '.modulation.h.'),
    (r'\.modulation\.projection_out\.', '.modulation.proj.'),
    (r'\.modulation\.layernorm\.', '.modulation.ln.'),
    (r'^layernorm\.', 'norm.'),
    (r'^classifier\.', 'head.'),
]
_OFFICIAL_TO_HF: List[Rule] = [
    (r'^patch_embed\.proj\.', 'embeddings.patch_embeddings.projection.'),
    (r'^patch_embed\.norm\.', 'embeddings.norm.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.', r'encoder.stages.\1.layers.\2.'),
    (r'^layers\.(\d+)\.downsample\.proj\.', r'encoder.stages.\1.downsample.projection.'),
    (r'^layers\.(\d+)\.downsample\.norm\.', r'encoder.stages.\1.downsample.norm.'),
    (r'\.modulation\.f\.', '.modulation.projection_in.'),
    (r'\.modulation\.h\.', '.modulation.projection_context.'),
    (r'\.modulation\.proj\.', '.modulation.projection_out.'),
    (r'\.modulation\.ln\.', '.modulation.layernorm.'),
    (r'^norm\.', 'layernorm.'),
]
# Weights that are nn.Linear [out, in] in the official model and 1x1 Conv2d [out, in, 1, 1] in timm.
_TIMM_CONV_AS_LINEAR = re.compile(r'\.(modulation\.f|modulation\.proj|mlp\.fc1|mlp\.fc2)\.weight$')

_HF_KEY = re.compile(r'^(focalnet\.|embeddings\.patch_embeddings\.|encoder\.stages\.)')
_TIMM_KEY = re.compile(r'^stem\.|\.ls[12]\.gamma$|\.norm[12]_post\.|^head\.fc\.|\.modulation\.norm\.')
_OFFICIAL_KEY = re.compile(r'^patch_embed\.|^layers\.\d+\.(blocks|downsample)\.')


def _rename(key: str, rules: Sequence[Rule]) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def detect_layout(keys) -> str:
    """'hf', 'timm' or 'official', recognised from the parameter names alone."""
    keys = list(keys)
    if any(_HF_KEY.search(k) for k in keys):
        return 'hf'
    if any(_TIMM_KEY.search(k) for k in keys):
        return 'timm'
    if any(_OFFICIAL_KEY.search(k) for k in keys):
        return 'official'
    raise CheckpointError(f'not a FocalNet state dict in a known layout ({", ".join(LAYOUTS)}); '
                          f'its first keys: {listing(keys)}')


def _convert(state_dict: StateDict) -> Tuple[StateDict, str, Dict[str, str]]:
    """(official state dict, layout, official key -> key in the file) of an extracted state dict."""
    layout = detect_layout(state_dict)
    rules = {'official': [], 'timm': _TIMM_TO_OFFICIAL, 'hf': _HF_TO_OFFICIAL}[layout]
    out: StateDict = {}
    origin: Dict[str, str] = {}
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if layout == 'timm' and _TIMM_CONV_AS_LINEAR.search(new) and value.dim() == 4 \
                and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        if new in out:
            raise CheckpointError(f'{origin[new]!r} and {key!r} both map to {new!r} '
                                  f'({layout} layout); the state dict mixes layouts')
        out[new] = value
        origin[new] = key
    return out, layout, origin


def convert_state_dict(state_dict: Mapping) -> Tuple[StateDict, str]:
    """(state dict in the official layout, layout it was in). Accepts a training checkpoint too."""
    out, layout, _ = _convert(extract_state_dict(state_dict))
    return out, layout


def to_timm(state_dict: Mapping, *, use_postln: bool) -> StateDict:
    """An official-layout state dict for ``timm.models.focalnet.FocalNet``.

    The official names do not say whether the blocks are post-norm (timm names those norms
    ``norm1_post``/``norm2_post``), so the caller says: ``use_postln`` of the model. timm has no
    isotropic (patch 16) FocalNet, so only multi-stage, patch-4 models have a timm layout.
    """
    state_dict = extract_state_dict(state_dict)
    stem = state_dict.get('patch_embed.proj.weight')
    if stem is not None and stem.shape[-1] not in (4, 7):
        raise CheckpointError(f'timm has no FocalNet with a {stem.shape[-1]}x{stem.shape[-1]} patch '
                              f'embedding (only patch 4, or the 7x7 convolutional stem)')
    rules = _OFFICIAL_TO_TIMM + (_OFFICIAL_TO_TIMM_POSTLN if use_postln else [])
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if _TIMM_CONV_AS_LINEAR.search(new) and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def to_hf(state_dict: Mapping) -> StateDict:
    """An official-layout state dict for HF transformers ``FocalNetForImageClassification``."""
    out = {}
    for key, value in extract_state_dict(state_dict).items():
        new = 'classifier.' + key[len('head.'):] if key.startswith('head.') else \
            'focalnet.' + _rename(key, _OFFICIAL_TO_HF)
        out[new] = value
    return out


# ---- loading into a model --------------------------------------------------------------------------

def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _named(key: str, origin: Dict[str, str]) -> str:
    source = origin.get(key, key)
    return key if source == key else f'{key} (file: {source})'


def _is_head(key: str) -> bool:
    return key.startswith('head.')


def _classifier_problem(ckpt: StateDict, target: StateDict, origin: Dict[str, str]) -> Optional[str]:
    """Why the file's classifier does not fit the model's, or None when it fits."""
    ckpt_head = {k: v for k, v in ckpt.items() if _is_head(k)}
    model_head = {k: v for k, v in target.items() if _is_head(k)}
    if not model_head and ckpt_head:
        return ('the model has no classifier (num_classes=0) but the file has '
                + ', '.join(f'{_named(k, origin)} {_shape(v)}' for k, v in ckpt_head.items()))
    if model_head and not ckpt_head:
        return ('the file has no classifier (a backbone-only checkpoint: build the model with '
                'num_classes=0 to use it as a backbone), the model has '
                + ', '.join(f'{k} {_shape(v)}' for k, v in model_head.items()))
    diffs = [f'{_named(k, origin)} file {_shape(ckpt_head[k])} vs model {_shape(v)}'
             for k, v in model_head.items() if k in ckpt_head and ckpt_head[k].shape != v.shape]
    if diffs:
        return 'the classifier does not match: ' + '; '.join(diffs)
    return None


STEM_KEY = 'patch_embed.proj.weight'


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """An RGB stem's convolution weight (out, 3, k, k) for ``in_chans`` input channels, as timm adapts
    stems: one channel gets the sum over R, G and B (a grey image then gives what the RGB model gives
    for the same grey in every channel); more channels repeat R, G, B cyclically, scaled by
    3 / in_chans so that the response to a constant image keeps its size."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise CheckpointError(f'cannot adapt a stem weight of shape {list(weight.shape)} to {in_chans} '
                              f'input channels: only 3-channel (RGB) stems are adapted')
    if in_chans == 3:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, -(-in_chans // 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return w.to(weight.dtype)


def _adapt_stem(state: StateDict, target: StateDict) -> Optional[str]:
    """Adapts the file's RGB stem in ``state`` to the model's input channels; says what it did."""
    ckpt, model = state.get(STEM_KEY), target.get(STEM_KEY)
    if ckpt is None or model is None or ckpt.shape == model.shape or ckpt.dim() != 4 \
            or ckpt.shape[1] != 3 or ckpt.shape[:1] + ckpt.shape[2:] != model.shape[:1] + model.shape[2:]:
        return None
    state[STEM_KEY] = adapt_input_conv(model.shape[1], ckpt)
    return f'{STEM_KEY}: 3 -> {model.shape[1]} input channels'


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, '_orig_mod', model)  # a torch.compile wrapper


def load_pretrained(model: nn.Module, path: Union[str, PathLike], *, replace_classifier: bool = False,
                    map_location='cpu') -> dict:
    """Load released FocalNet weights (official, timm or HF layout; any supported file) strictly.

    Every parameter of the model must be in the file with the same shape, and the file must hold
    nothing else; otherwise a CheckpointError names the offending keys and shapes. Two exceptions:
    an RGB stem is adapted to a model built with another ``in_chans`` (``adapt_input_conv``), and,
    only when asked, the classifier: with ``replace_classifier=True`` a file classifier that
    does not fit (another number of classes, or none at all) is dropped and the model keeps its
    freshly initialised head, for fine-tuning. Returns a report: {'layout', 'missing', 'unexpected',
    'replaced_classifier', 'dropped', 'adapted', 'num_tensors', 'path'}; 'adapted' lists the
    adapted tensors.
    """
    model = _unwrap(model)
    # Mapped, not read: a multi-GB release is not held in memory twice while it is copied in.
    state = extract_state_dict(read_state_file(path, map_location, mmap=True), str(path))
    try:
        state, layout, origin = _convert(state)
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from None
    target = model.state_dict()
    adapted = [note for note in [_adapt_stem(state, target)] if note]

    head_problem = _classifier_problem(state, target, origin)
    dropped: List[str] = []
    if head_problem and replace_classifier:
        dropped = [origin[k] for k in state if _is_head(k)]
        state = {k: v for k, v in state.items() if not _is_head(k)}
        state.update({k: v for k, v in target.items() if _is_head(k)})

    def checked(keys):  # a classifier that does not fit is reported once, below
        return [k for k in keys if not (head_problem and _is_head(k))]

    missing = checked(k for k in target if k not in state)
    unexpected = checked(k for k in state if k not in target)
    mismatched = checked(k for k in target if k in state and state[k].shape != target[k].shape)

    problems = []
    if missing:
        problems.append(f'{len(missing)} missing from the file:' + _ITEM
                        + listing([f'{k} {_shape(target[k])}' for k in missing], sep=_ITEM))
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected in the file:' + _ITEM + listing(
            [f'{_named(k, origin)} {_shape(state[k])}' for k in unexpected], sep=_ITEM))
    if mismatched:
        problems.append(f'{len(mismatched)} of another shape:' + _ITEM + listing(
            [f'{_named(k, origin)} file {_shape(state[k])} vs model {_shape(target[k])}'
             for k in mismatched], sep=_ITEM))
    if head_problem and not replace_classifier:
        problems.append(head_problem + '; to fine-tune with the model\'s freshly initialised '
                        'classifier instead, pass replace_classifier=True')
    if problems:
        raise CheckpointError(f'{path}: the {layout}-layout checkpoint does not fit the model:\n  '
                              + '\n  '.join(problems))

    model.load_state_dict(state, strict=True)
    return {'layout': layout, 'missing': [], 'unexpected': [],
            'replaced_classifier': bool(head_problem) and replace_classifier,
            'dropped': dropped, 'adapted': adapted, 'num_tensors': len(state), 'path': str(path)}
