"""Export a FocalNet for deployment, and check the exported model against PyTorch.

    python tools/export.py --model focalnet_tiny_srf --checkpoint focalnet_tiny_srf.pth \
        --format onnx --output focalnet_tiny_srf.onnx --dynamic-batch

Formats:

* ``onnx``: an ONNX graph (torch.onnx's exporter built on torch.export, which needs ``onnxscript``),
  for ONNX Runtime, TensorRT, OpenVINO and other runtimes. Checked with ONNX Runtime.
* ``export``: a ``torch.export`` program (``.pt2``, ``torch.export.load``), for AOTInductor,
  ExecuTorch and other PyTorch deployment paths without the model's Python code.
* ``torchscript``: ``torch.jit.script`` (``.pt``, ``torch.jit.load``), for existing libtorch (C++)
  deployments; TorchScript is deprecated in PyTorch, prefer the other two for new work.

The input is ``(batch, 3, H, W)`` images normalised as in evaluation; the output the logits. With
``--dynamic-batch`` the batch size is free (H and W stay those of the export). After writing, the
exported model is run next to the PyTorch model on the same random inputs (at two batch sizes when
the batch is dynamic); the command fails when the relative error exceeds ``--tolerance``.
"""
import argparse
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):
    # Run as a script (python tools/export.py): make the repository's packages importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn

from errors import UserError

logger = logging.getLogger('focalnet.export')

FORMATS = ('onnx', 'export', 'torchscript')
SUFFIXES = {'onnx': '.onnx', 'export': '.pt2', 'torchscript': '.pt'}
INPUT, OUTPUT = 'images', 'logits'
# ONNX opsets --opset may ask for. torch.onnx writes opset 18 natively and converts the graph to
# another with onnx's version converter, which fails (and leaves opset 18 written) below 18 and, with
# onnx 1.19's converter, above 25 (FocalNet's Gelu). The written opset is checked after export too.
OPSETS = range(18, 26)
# The largest example batch: the check runs the model on it twice, in PyTorch and in the runtime.
MAX_BATCH = 1024


class CheckFailed(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


# ---- export -----------------------------------------------------------------------------------------

def _batch_dim(dynamic_batch: bool) -> Optional[Dict[str, Dict[int, torch.export.Dim]]]:
    # The parameter of FocalNet.forward is named x.
    return {'x': {0: torch.export.Dim('batch', min=1)}} if dynamic_batch else None


def _traceable(example: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    # torch.export treats a dimension of size 1 as the constant 1; a free batch is traced with 2.
    return example.expand(2, *example.shape[1:]) if dynamic_batch and len(example) == 1 else example


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = False,
                opset: Optional[int] = None) -> Path:
    """Writes the ONNX graph of ``model`` on inputs shaped like ``example``."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError('ONNX export needs the onnx and onnxscript packages: '
                        'pip install -r requirements-export.txt') from None
    kwargs = {} if opset is None else {'opset_version': opset}
    # One self-contained file, unless the weights pass protobuf's 2 GB limit (the huge models):
    # then they go to <output>.data next to it.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the exporter's progress chatter
        torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_shapes=_batch_dim(dynamic_batch),
                          external_data=weight_bytes > 1.8e9, verbose=False, report=False, **kwargs)
    if opset is not None:
        import onnx
        written = [o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                   if o.domain in ('', 'ai.onnx')]
        if written != [opset]:
            raise UserError(f'--opset {opset}: the exporter could not convert the graph and wrote opset '
                            f'{written[0] if written else "?"} to {path}; use an opset it reaches')
    return path


def export_program(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = False) -> Path:
    program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim(dynamic_batch))
    torch.export.save(program, str(path))
    return path


def export_torchscript(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # "torch.jit.script is deprecated"
        torch.jit.script(model).save(str(path))
    return path


def export(model: nn.Module, fmt: str, example: torch.Tensor, path: Path, dynamic_batch: bool = False,
           opset: Optional[int] = None) -> Path:
    """``model`` in eval mode to ``path`` in format ``fmt`` (one of FORMATS)."""
    model = model.eval()
    example = _traceable(example, dynamic_batch)
    with torch.no_grad():
        if fmt == 'onnx':
            return export_onnx(model, example, path, dynamic_batch, opset)
        if fmt == 'export':
            return export_program(model, example, path, dynamic_batch)
        if fmt == 'torchscript':
            return export_torchscript(model, path)
    raise UserError(f'unknown format {fmt!r}; use one of {", ".join(FORMATS)}')


# ---- running what was exported ----------------------------------------------------------------------

def onnx_runner(path: Path):
    """A function images -> logits running the ONNX file in ONNX Runtime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError('checking an ONNX export needs onnxruntime: '
                        'pip install -r requirements-export.txt (or pass --no-check)') from None
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
    return run


def load_runner(fmt: str, path: Path):
    """A function images -> logits running the exported file as its users will."""
    if fmt == 'onnx':
        return onnx_runner(path)
    if fmt == 'export':
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # "torch.jit.load is deprecated"
        return torch.jit.load(str(path))


def check(model: nn.Module, fmt: str, path: Path, inputs: Sequence[torch.Tensor]) -> List[dict]:
    """Runs the exported file and the PyTorch model on each input: their relative errors."""
    run = load_runner(fmt, path)
    results = []
    with torch.no_grad():
        for x in inputs:
            want, got = model(x), run(x)
            if tuple(got.shape) != tuple(want.shape):
                raise CheckFailed(f'{path}: output shape {tuple(got.shape)} for input '
                                   f'{tuple(x.shape)}; PyTorch gives {tuple(want.shape)}')
            results.append({'input': tuple(x.shape), 'relative_error': relative_error(got, want),
                            'max_abs_diff': (got - want).abs().max().item()})
    return results


def check_inputs(batch: int, size: Tuple[int, int], dynamic_batch: bool, seed: int = 0) -> List[torch.Tensor]:
    """The export's own batch, and with a dynamic batch one more size (1, or batch + 1)."""
    g = torch.Generator().manual_seed(seed)
    batches = [batch] + ([batch + 1 if batch == 1 else 1] if dynamic_batch else [])
    return [torch.randn(b, 3, *size, generator=g) for b in batches]


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='tools/export.py',
        description='Export a FocalNet to ONNX, torch.export or TorchScript and check it against PyTorch.')
    parser.add_argument('--model', help='a release name (its config in configs/), e.g. focalnet_tiny_srf')
    parser.add_argument('--cfg', help='a config file instead of --model')
    parser.add_argument('--checkpoint', help='weights in any layout models.load_pretrained reads '
                        '(official, timm, Hugging Face); the number of classes follows the file')
    parser.add_argument('--format', choices=FORMATS, default='onnx', help='default: onnx')
    parser.add_argument('--output', required=True, help='file to write (.onnx, .pt2 or .pt)')
    parser.add_argument('--batch-size', type=int, default=1, help='batch of the example input (default 1)')
    parser.add_argument('--img-size', type=int, nargs='+', metavar=('H', 'W'),
                        help='input height and width (one number for square); default DATA.IMG_SIZE')
    parser.add_argument('--dynamic-batch', action='store_true',
                        help='any batch size at run time (ONNX and torch.export; TorchScript always is)')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter\'s)')
    parser.add_argument('--no-check', action='store_true', help='do not run the exported model')
    parser.add_argument('--tolerance', type=float, default=1e-5,
                        help='largest relative error against PyTorch (default 1e-5)')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE',
                        help='config overrides, e.g. --opts MODEL.NUM_CLASSES 10')
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> Path:
    """The numeric flags in range and the output writable, before the model is built; the output."""
    from tools.loading import check_img_size
    from tools.outputs import check_output_file
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UserError(f'--batch-size must be from 1 to {MAX_BATCH}; got {args.batch_size}')
    if args.img_size is not None:
        if len(args.img_size) > 2:
            raise UserError(f'--img-size takes H [W]; got {" ".join(map(str, args.img_size))}')
        for side in args.img_size:
            check_img_size(side)
    if args.opset is not None and args.format != 'onnx':
        raise UserError(f'--opset is for --format onnx; got --format {args.format}')
    if args.opset is not None and args.opset not in OPSETS:
        raise UserError(f'--opset must be from {OPSETS[0]} to {OPSETS[-1]} (18: what the exporter writes '
                        f'natively; {OPSETS[-1]}: the newest its converter reaches); got {args.opset}')
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UserError(f'--tolerance must be a finite number >= 0 (a relative error); got {args.tolerance}')
    return check_output_file(args.output, '--output')


def run(args: argparse.Namespace) -> dict:
    from tools.loading import load_model
    output = check_flags(args)
    config, model, _ = load_model(args.cfg, args.model, args.checkpoint, args.opts)
    size = args.img_size or [config.DATA.IMG_SIZE]
    size = (size[0], size[-1])
    if min(size) < model.strides[-1]:
        raise UserError(f'--img-size {size[0]} {size[1]} is smaller than the model\'s total stride '
                        f'{model.strides[-1]}')
    if output.suffix != SUFFIXES[args.format]:
        logger.warning('%s: %s files usually end in %s', output, args.format, SUFFIXES[args.format])

    example = torch.randn(args.batch_size, 3, *size)
    logger.info('exporting %s (%s) for inputs (%s, 3, %d, %d) to %s', config.MODEL.NAME, args.format,
                'batch' if args.dynamic_batch else args.batch_size, *size, output)
    export(model, args.format, example, output, args.dynamic_batch, args.opset)
    summary = {'output': str(output), 'format': args.format, 'checks': []}
    if args.no_check:
        return summary
    summary['checks'] = check(model, args.format, output,
                              check_inputs(args.batch_size, size, args.dynamic_batch))
    for c in summary['checks']:
        logger.info('input %s: relative error %.2e, largest difference %.2e against PyTorch',
                    c['input'], c['relative_error'], c['max_abs_diff'])
    worst = max(c['relative_error'] for c in summary['checks'])
    if worst > args.tolerance:
        raise CheckFailed(f'{output}: the exported model differs from PyTorch (relative error '
                           f'{worst:.2e} > --tolerance {args.tolerance:g})')
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
    logging.getLogger('focalnet').setLevel(logging.INFO)  # ours; not the exporters' chatter
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f'tools/export.py: error: {e}', file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f'tools/export.py: check failed: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
