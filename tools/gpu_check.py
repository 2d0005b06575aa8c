"""Everything that runs on a GPU, checked in one command: ``bash benchmarks/gpu_check.sh``.

    bash benchmarks/gpu_check.sh                 # a CUDA machine: every check, results into benchmarks/
    bash benchmarks/gpu_check.sh --cpu           # the same checks on the CPU, small (what CI runs)
    bash benchmarks/gpu_check.sh --only train fused

Each check prints ``PASS`` or ``FAIL`` with a line of detail; a report (markdown and JSON, with the
device, the versions and the commit) is written at the end, and the exit status is 1 if any check
failed. The checks:

* ``train``: training steps of focalnet_tiny_srf, focalnet_tiny_iso and a large-style model (conv
  stem, layer scale, post-norm; focalnet_large_fl3) through main.py's own training step, on one
  repeated batch: the loss must stay finite and fall. CUDA: the release architectures at 224 px, in
  bfloat16 autocast and in float16 autocast with the gradient scaler. CPU: shrunk models at 64 px,
  float32 and bfloat16 autocast.
* ``ddp``: main.py under torchrun on synthetic images: NCCL over every visible GPU, with AMP (CUDA),
  or gloo over 2 processes (CPU). Every rank finishes, the logged losses are finite.
* ``fused``: the Triton context aggregation (models/fused.py) against the plain path, forward and
  the gradients, float32 and bfloat16, module by module and (CUDA) in a whole model, with the time
  of each path. CPU: small cases in Triton's interpreter.
* ``compile``: torch.compile of a model, forward and gradients against eager, then training steps.
  CUDA: inductor. CPU: the aot_eager backend (inductor's C++ build would take minutes here).
* ``visualize``: tools/visualize.py on scikit-learn's two sample photos, on the device.
* ``benchmark``: the commands of benchmarks/README.md (CUDA; the fused path timed with and without
  FOCALNET_FUSED=1), or their ``--quick`` forms (CPU).
* ``pipeline``: the training input path's device side on real JPEGs: RandAugment ops left to the
  device give the pixels Pillow gives in the loader worker; JPEGs decoded there (DATA.GPU_DECODE,
  nvJPEG) within 35 dB PSNR of the worker's decode (identical on the CPU); the time per image of
  finishing a batch on the device and of the worker's share.

CUDA mode writes into benchmarks/ (``gpu_check_<gpu>.md``/``.json`` and the benchmark tables named as
in benchmarks/README.md); ``--cpu`` writes into benchmarks/tmp/gpu_check_cpu/ (not tracked) unless
``--out`` says otherwise.
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CHECKS = ('train', 'ddp', 'fused', 'compile', 'visualize', 'benchmark', 'pipeline')


class CheckFailed(Exception):
    """A check ran and its result is wrong; the message says what."""


class CheckSkipped(Exception):
    """A check that cannot run here (the message says why); only the CPU mode skips anything."""


# ---------------------------------------------------------------------------------------------------
# Settings per mode
# ---------------------------------------------------------------------------------------------------

# (label, config file, --opts) of the models the training check steps; 'shrink' opts apply on the CPU.
TRAIN_MODELS = [
    ('focalnet_tiny_srf', 'focalnet_tiny_srf.yaml', []),
    ('focalnet_tiny_iso', 'focalnet_tiny_iso.yaml', []),
    ('focalnet_large_fl3 (large-style)', 'focalnet_large_fl3.yaml', []),
]
CPU_SHRINK = {
    'focalnet_tiny_srf.yaml': ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]'],
    'focalnet_tiny_iso.yaml': ['MODEL.FOCAL.EMBED_DIM', '32', 'MODEL.FOCAL.DEPTHS', '[2]'],
    'focalnet_large_fl3.yaml': ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]'],
}


def settings(cpu: bool) -> dict:
    if cpu:
        return dict(device=torch.device('cpu'), img_size=64, batch=8, steps=6,
                    amp=[('float32', None), ('bfloat16', torch.bfloat16)])
    return dict(device=torch.device('cuda'), img_size=224, batch=16, steps=12,
                amp=[('bfloat16', torch.bfloat16), ('float16 + scaler', torch.float16)])


# ---------------------------------------------------------------------------------------------------
# train: main.py's training step on a repeated batch
# ---------------------------------------------------------------------------------------------------

class _LossRecorder:
    """Stands in for the TensorBoard writer: keeps the per-step losses train_one_epoch reports."""

    def __init__(self):
        self.losses: List[float] = []

    def add_scalar(self, tag: str, value: float, step: int):
        if tag == 'train/loss':
            self.losses.append(value)


def train_steps(cfg_file: str, opts: List[str], device: torch.device, dtype: Optional[torch.dtype],
                steps: int, batch: int, img_size: int) -> dict:
    """Losses of ``steps`` optimizer steps of the classification train_one_epoch on one repeated batch."""
    import main
    from classification.engine import ClassificationTrainer, train_one_epoch
    from config import load_config
    from engine import OptimizerStep, make_autocast, make_scaler
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer

    config = load_config(str(ROOT / 'configs' / cfg_file), opts + [
        'DATA.IMG_SIZE', str(img_size), 'MODEL.NUM_CLASSES', '10', 'MODEL.DROP_PATH_RATE', '0.0',
        'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0',
        'TRAIN.BASE_LR', '1e-3', 'TRAIN.MIN_LR', '1e-4', 'PRINT_FREQ', '1'])
    torch.manual_seed(0)
    model = main.make_model(config).to(device)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps)
    scaler = make_scaler(device, dtype)
    step = OptimizerStep(model, model, optimizer, scaler, make_autocast(device, dtype),
                         clip_grad=config.TRAIN.CLIP_GRAD)
    recorder = _LossRecorder()
    trainer = ClassificationTrainer(config, model, model, optimizer, scheduler, scaler, step, device,
                                    writer=recorder, criterion=main.build_criterion(config, None))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    targets = torch.randint(0, 10, (batch,), generator=g)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_one_epoch(trainer, [(images, targets)] * steps, epoch=0, num_steps=steps)
    seconds = time.perf_counter() - start
    losses = recorder.losses
    result = {'losses': [round(v, 4) for v in losses], 'seconds': round(seconds, 2),
              'scale': scaler.get_scale() if scaler.is_enabled() else None}
    if device.type == 'cuda':
        result['peak_mib'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    if len(losses) != steps or not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f'losses {result["losses"]}')
    first, last = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    if not last < first:
        raise CheckFailed(f'the loss did not fall: {result["losses"]}')
    return result


def check_train(mode: dict, out: Path) -> dict:
    details, failures = {}, []
    for label, cfg_file, opts in TRAIN_MODELS:
        opts = opts + (CPU_SHRINK[cfg_file] if mode['device'].type == 'cpu' else [])
        for amp_name, dtype in mode['amp']:
            key = f'{label}, {amp_name}'
            try:
                details[key] = train_steps(cfg_file, opts, mode['device'], dtype, mode['steps'],
                                           mode['batch'], mode['img_size'])
            except CheckFailed as e:
                failures.append(f'{key}: {e}')
                details[key] = {'error': str(e)}
    if failures:
        raise CheckFailed('; '.join(failures))
    summary = ', '.join(f'{k}: {v["losses"][0]:.3f} -> {v["losses"][-1]:.3f}' for k, v in details.items())
    return {'summary': summary, 'runs': details}


# ---------------------------------------------------------------------------------------------------
# ddp: main.py under torchrun
# ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(command: List[str], env: Optional[dict] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-12:]
        raise CheckFailed(f'{" ".join(command[:6])} ... exited with {proc.returncode}:\n' + '\n'.join(tail))
    return proc


def check_ddp(mode: dict, out: Path) -> dict:
    cpu = mode['device'].type == 'cpu'
    procs = 2 if cpu else torch.cuda.device_count()
    if cpu:
        opts = ['MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1]', 'MODEL.FOCAL.FOCAL_LEVELS', '[2, 2]',
                'MODEL.FOCAL.FOCAL_WINDOWS', '[3, 3]', 'MODEL.FOCAL.FOCAL_FACTORS', '[2, 2]',
                'DATA.IMG_SIZE', '32', 'DATA.FAKE_SIZE', '32', 'MODEL.NUM_CLASSES', '10', 'DATA.NUM_WORKERS', '0',
                'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'PRINT_FREQ', '1']
        batch = 4
    else:
        opts = ['DATA.FAKE_SIZE', str(64 * 16 * procs), 'MODEL.NUM_CLASSES', '100', 'DATA.NUM_WORKERS', '4',
                'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'PRINT_FREQ', '4']
        batch = 64
    run_root = out / 'ddp_run'
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(procs),
               '--master_port', str(_free_port()), 'main.py', '--cfg', 'configs/focalnet_tiny_srf.yaml',
               '--dataset', 'fake', '--batch-size', str(batch), '--output', str(run_root), '--tag', 'ddp',
               '--opts', *opts]
    start = time.perf_counter()
    proc = _run(command, env={'OMP_NUM_THREADS': '1'})  # one thread per process: they share the cores
    run = run_root / 'focalnet_tiny_srf' / 'ddp'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    if [r['epoch'] for r in records] != [0, 1]:
        raise CheckFailed(f'metrics for epochs {[r["epoch"] for r in records]}, expected [0, 1]')
    if not all(math.isfinite(r['train_loss']) and math.isfinite(r['val_loss']) for r in records):
        raise CheckFailed(f'non-finite losses: {records}')
    for rank in range(procs):
        log = (run / f'log_rank{rank}.txt').read_text()
        if f'rank {rank} of {procs} on {"cpu" if cpu else "cuda"}' not in log:
            raise CheckFailed(f'rank {rank}\'s log does not say it ran as rank {rank} of {procs}')
    if 'Grad strides do not match' in proc.stderr:
        raise CheckFailed('DDP warned that gradient strides do not match the parameters')
    backend = 'gloo' if cpu else 'nccl'
    return {'summary': f'{procs} processes ({backend}), train loss '
                       f'{records[0]["train_loss"]:.3f} -> {records[-1]["train_loss"]:.3f}',
            'seconds': round(time.perf_counter() - start, 1), 'metrics': records}


# ---------------------------------------------------------------------------------------------------
# fused: the Triton aggregation against the plain path
# ---------------------------------------------------------------------------------------------------

# (dim, focal levels, focal window, normalize_modulator, (B, H, W))
FUSED_CASES_CUDA = [(96, 2, 3, False, (8, 56, 56)), (192, 3, 3, False, (8, 28, 28)),
                    (384, 4, 3, True, (4, 14, 14)), (70, 3, 5, False, (2, 9, 37))]
FUSED_CASES_CPU = [(8, 2, 3, False, (1, 4, 9))]
TENSORS = ['output', 'grad ctx', 'grad gates']


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def fused_errors(device: str, cases, dtypes=('float32', 'bfloat16')) -> Dict[str, dict]:
    """Relative errors of models.fused.fused_aggregate against FocalModulation.aggregate."""
    from models import fused
    from models.focalnet import FocalModulation
    results = {}
    for dim, levels, window, normalize, (B, H, W) in cases:
        for dtype_name in dtypes:
            torch.manual_seed(0)
            dtype = getattr(torch, dtype_name)
            mod = FocalModulation(dim, levels, window, normalize_modulator=normalize)
            with torch.no_grad():
                for layer in mod.focal_layers:
                    layer[0].weight.mul_(3)  # larger weights, so that GELU's curvature matters
            mod = mod.to(device=device, dtype=dtype)
            weights = [layer[0].weight for layer in mod.focal_layers]
            # ctx and gates as modulate() makes them: strided slices of one channels-last projection.
            proj = torch.randn(B, H, W, 2 * dim + levels + 1, device=device).to(dtype)
            ctx = proj[..., dim:2 * dim].permute(0, 3, 1, 2).detach().requires_grad_()
            gates = proj[..., 2 * dim:].permute(0, 3, 1, 2).detach().requires_grad_()
            grad_out = torch.randn(ctx.shape, device=device).to(dtype)
            ref = mod.aggregate(ctx, gates)
            ref_grads = torch.autograd.grad(ref, [ctx, gates, *weights], grad_out)
            got = fused.fused_aggregate(ctx, gates, weights, normalize)
            grads = torch.autograd.grad(got, [ctx, gates, *weights], grad_out)
            names = TENSORS + [f'grad weight {i}' for i in range(levels)]
            results[f'dim {dim}, L {levels}, k {window}, {dtype_name}, {B}x{H}x{W}'] = {
                name: _rel(a, b) for name, a, b in zip(names, (got, *grads), (ref, *ref_grads))}
    return results


def _fused_model_errors_and_times(batch: int) -> dict:
    """focalnet_tiny_srf with and without the fused aggregation on CUDA: errors and step times."""
    from models import create_model, fused
    if not fused.fused_available(torch.empty(1, device='cuda')):
        raise CheckFailed('the fused path is not available on this CUDA device (is triton installed?)')
    torch.manual_seed(0)
    model = create_model('focalnet_tiny_srf', drop_path_rate=0.0).cuda()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    outputs = []
    for on in (False, True):
        model.set_fused_aggregation(on)
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().mean().backward()
        outputs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = outputs
    errors = {'output': _rel(got, ref),
              'grads (worst parameter)': max(_rel(grads[n], g) for n, g in ref_grads.items())}
    # Time a bf16 training step (forward and backward) of each path, median of 20 after warm-up.
    times = {}
    xb = torch.randn(batch, 3, 224, 224, device='cuda').to(memory_format=torch.channels_last)
    for name, on in (('plain', False), ('fused', True)):
        model.set_fused_aggregation(on)
        samples = []
        for i in range(30):
            torch.cuda.synchronize()
            tic = time.perf_counter()
            with torch.autocast('cuda', dtype=torch.bfloat16):
                loss = model(xb).float().square().mean()
            loss.backward()
            torch.cuda.synchronize()
            if i >= 10:
                samples.append(time.perf_counter() - tic)
            model.zero_grad(set_to_none=True)
        times[name] = round(1000 * statistics.median(samples), 2)
    return {'errors': errors, 'ms_per_train_step_bf16_batch%d' % batch: times}


def check_fused(mode: dict, out: Path) -> dict:
    from models import fused
    if not fused.triton_importable():
        # A CPU-only torch comes without triton, and then never takes the fused path; CUDA needs it.
        if mode['device'].type == 'cpu':
            raise CheckSkipped('triton is not installed (CPU-only torch); the fused path needs it on CUDA')
        raise CheckFailed('triton is not installed; the fused path needs it')
    if mode['device'].type == 'cpu':
        # Triton decides at import whether kernels are interpreted: run in a fresh process.
        code = ('import json, sys; sys.path.insert(0, sys.argv[1]); from tools import gpu_check as g; '
                'print(json.dumps(g.fused_errors("cpu", g.FUSED_CASES_CPU)))')
        proc = _run([sys.executable, '-c', code, str(ROOT)], env={'TRITON_INTERPRET': '1'})
        cases = json.loads(proc.stdout.strip().splitlines()[-1])
        model = None
    else:
        # float32 compared without TF32, which cuDNN would otherwise use in the plain path's convolutions.
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        switch = os.environ.get('FOCALNET_FUSED')
        os.environ['FOCALNET_FUSED'] = '1'  # read at every call; put back for the checks after this one
        try:
            cases = fused_errors('cuda', FUSED_CASES_CUDA)
            model = _fused_model_errors_and_times(batch=64)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            if switch is None:
                os.environ.pop('FOCALNET_FUSED')
            else:
                os.environ['FOCALNET_FUSED'] = switch
    # float32: the same arithmetic up to summation order; bfloat16: the plain path rounds after every
    # operation, the fused one once per stored tensor.
    bad = [f'{case}: {name} {err:.2e}' for case, errs in cases.items() for name, err in errs.items()
           if err > (1e-4 if 'float32' in case else 3e-2)]
    if model is not None:
        errs = model['errors']
        if errs['output'] > 1e-4 or errs['grads (worst parameter)'] > 1e-3:
            bad.append(f'focalnet_tiny_srf: {errs}')
    if bad:
        raise CheckFailed('; '.join(bad))
    worst = max(err for errs in cases.values() for err in errs.values())
    summary = f'{len(cases)} module cases, worst relative error {worst:.1e}'
    if model is not None:
        summary += f'; whole model {model["errors"]}; train step ms {model[next(k for k in model if k.startswith("ms"))]}'
    return {'summary': summary, 'cases': cases, 'model': model}


# ---------------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------------

def check_compile(mode: dict, out: Path) -> dict:
    from models import create_model
    cpu = mode['device'].type == 'cpu'
    device = mode['device']
    torch.manual_seed(0)
    if cpu:
        model = create_model('focalnet_tiny_srf', embed_dim=16, depths=(1, 1, 1, 1), num_classes=10,
                             drop_path_rate=0.0)
        size, batch, backend = 64, 4, 'aot_eager'
    else:
        model = create_model('focalnet_tiny_srf', num_classes=100, drop_path_rate=0.0)
        size, batch, backend = 224, 32, 'inductor'
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        start = time.perf_counter()
        out_c = compiled(x)
        out_c.square().mean().backward()
        compile_s = time.perf_counter() - start
        grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        out_e = model(x)
        out_e.square().mean().backward()
        errors = {'output': _rel(out_c, out_e),
                  'grads (worst parameter)': max(_rel(grads_c[n], p.grad) for n, p in model.named_parameters())}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    if errors['output'] > 1e-4 or errors['grads (worst parameter)'] > 1e-3:
        raise CheckFailed(f'compiled and eager differ: {errors}')
    # A few training steps of the compiled model (bf16 autocast on CUDA): finite and falling.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=not cpu)
    losses = []
    for _ in range(8):
        with autocast():
            loss = torch.nn.functional.cross_entropy(compiled(x).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    if not all(math.isfinite(v) for v in losses) or not statistics.mean(losses[-3:]) < statistics.mean(losses[:3]):
        raise CheckFailed(f'compiled training: losses {losses}')
    return {'summary': f'{backend}, fullgraph; first step {compile_s:.1f}s; errors vs eager '
                       f'{errors["output"]:.1e} (output), {errors["grads (worst parameter)"]:.1e} (grads); '
                       f'loss {losses[0]:.3f} -> {losses[-1]:.3f}',
            'errors': errors, 'losses': losses, 'first_step_s': round(compile_s, 1)}


# ---------------------------------------------------------------------------------------------------
# visualize and benchmark: the tools' own command lines
# ---------------------------------------------------------------------------------------------------

def check_visualize(mode: dict, out: Path) -> dict:
    from sklearn.datasets import load_sample_images
    china, flower = load_sample_images().filenames
    folder = out / 'visualize'
    command = [sys.executable, 'tools/visualize.py', '--cfg', 'configs/focalnet_tiny_srf.yaml',
               '--image', china, '--image', flower, '--output', str(folder), '--device', mode['device'].type]
    if mode['device'].type == 'cpu':
        command += ['--img-size', '64', '--opts', 'MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]']
    _run(command)
    figures = {name: (folder / name).stat().st_size if (folder / name).is_file() else 0
               for name in ('kernels.png', 'gating_maps.png', 'modulator.png')}
    if not all(size > 1000 for size in figures.values()):
        raise CheckFailed(f'figures missing or empty: {figures}')
    return {'summary': 'kernels, gating maps and modulator of the two sample photos, '
                       f'{sum(figures.values()) // 1024} KiB of PNG', 'bytes': figures}


def gpu_slug(name: Optional[str] = None) -> str:
    """A short name for the GPU in file names: 'h100' for 'NVIDIA H100 80GB HBM3'."""
    name = name or torch.cuda.get_device_name(0)
    match = re.search(r'\b([A-Za-z]+\d+[A-Za-z]*)\b', name)
    return (match.group(1) if match else re.sub(r'\W+', '_', name.replace('NVIDIA', '')).strip('_')).lower()


def benchmark_commands(cpu: bool, results: Path, slug: str) -> List[tuple]:
    """(label, arguments of tools/benchmark.py, extra environment) for each benchmark run."""
    if cpu:
        quick = ['--quick', '--device', 'cpu', '--threads', '1']
        return [('table', ['--table', '--throughput', '--models', 'focalnet_tiny_iso', *quick], {}),
                ('compare_timm', ['--compare', 'timm', *quick], {})]
    common = ['--device', 'cuda', '--amp', 'bf16', '--batch-size', '128', '--channels-last']
    runs = [('table', ['--table', '--throughput', *common], {}),
            ('compare_timm', ['--compare', 'timm', *common], {}),
            ('compare_timm_fused', ['--compare', 'timm', *common], {'FOCALNET_FUSED': '1'}),
            ('compare_timm_compiled', ['--compare', 'timm', *common, '--compile', 'other'], {}),
            ('compare_hf', ['--compare', 'hf', *common], {})]
    return [(label, args + ['--json', str(results / f'{label}_{slug}.json'),
                            '--markdown', str(results / f'{label}_{slug}.md')], env)
            for label, args, env in runs]


def check_benchmark(mode: dict, out: Path) -> dict:
    cpu = mode['device'].type == 'cpu'
    slug = 'cpu' if cpu else gpu_slug()
    results = {}
    for label, args, env in benchmark_commands(cpu, out, slug):
        if cpu:
            args = args + ['--json', str(out / f'{label}_{slug}.json')]
        start = time.perf_counter()
        _run([sys.executable, 'tools/benchmark.py', *args], env=env)
        rows = json.loads(Path(args[args.index('--json') + 1]).read_text())
        results[label] = {'seconds': round(time.perf_counter() - start, 1), 'rows': rows}
    summary = []
    for label, r in results.items():
        if label == 'table':
            summary.append('table: ' + ', '.join(f'{row["config"]} {row["throughput_imgs_s"]:.0f}/s'
                                                 for row in r['rows']))
        else:
            ours = r['rows'][0]
            summary.append(f'{label}: ours/other inference {ours["infer_ratio_vs_other"]:.2f}, '
                           f'training {ours["train_ratio_vs_other"]:.2f}')
    return {'summary': '; '.join(summary), 'runs': results}


# ---------------------------------------------------------------------------------------------------
# pipeline: the training input path's device side (data/device_augment.py, DATA.GPU_DECODE)
# ---------------------------------------------------------------------------------------------------

def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from timm.data.constants import IMAGENET_DEFAULT_STD
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=a.device).view(1, 3, 1, 1) * 255
    mse = float((((a - b) * std) ** 2).mean())
    return float('inf') if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def check_pipeline(mode: dict, out: Path) -> dict:
    """Batches of real JPEGs (the bundled photos, 250-500 px) through the fast path three ways, same
    draws: every op in the loader worker; RandAugment's trailing ops left to the device; decoding left
    to the device as well (DATA.GPU_DECODE). The first two must give the same pixels on the device; the
    third the same on the CPU (libjpeg-turbo both sides) and within 35 dB PSNR on a GPU (nvJPEG decodes
    slightly differently). On a GPU, queueing the ops must not wait for the device. Times
    RawBatch.to(device) per image (and the part the training process spends queueing it) and the
    worker's CPU per image."""
    import random as random_module
    import numpy as np
    import config as cfg
    from data.fast_transform import RawBatch, fast_train_transform
    from data.photos import write_photo_folder
    from data.transforms import build_transform
    from tools.benchmark import sync
    device = mode['device']
    count = 32 if device.type == 'cpu' else 128
    root = write_photo_folder(out / 'pipeline_photos', count, seed=0, sizes=(250, 500))
    files = sorted((root / 'train').rglob('*.jpg'))
    config = cfg.load_config(None, [])
    options = {'in_worker': {}, 'ops_on_device': {'device_augment': True}, 'decode_on_device': {'gpu_decode': True}}
    variants = {name: fast_train_transform(build_transform(True, config), **kw) for name, kw in options.items()}
    raws, worker_ms = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        for name, transform in variants.items():
            start, raws[name] = time.process_time(), []
            for seed, path in enumerate(files):
                data = path.read_bytes()
                random_module.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                raws[name].append(transform(data, str(path)))
            worker_ms[name] = (time.process_time() - start) * 1e3 / len(files)
    finally:
        torch.set_num_threads(threads)
    batches = {name: RawBatch.collate(r) for name, r in raws.items()}
    if device.type == 'cuda':  # as the loader's pinning thread hands them over
        batches = {name: batch.pin_memory() for name, batch in batches.items()}
    finished, finish_ms, launch_ms = {}, {}, {}
    for name, batch in batches.items():
        finished[name] = batch.to(device, non_blocking=True)  # warm-up (kernels, nvJPEG handles)
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            finished[name] = batch.to(device, non_blocking=True)
        launch_ms[name] = (time.perf_counter() - start) * 1e3 / 3 / count
        sync(device)
        finish_ms[name] = (time.perf_counter() - start) * 1e3 / 3 / count
    if device.type == 'cuda':
        # The training process must not wait for the device while it queues the ops (the step's
        # kernels would drain first, every batch): any wait raises here.
        torch.cuda.set_sync_debug_mode('error')
        try:
            batches['ops_on_device'].to(device, non_blocking=True)
        except RuntimeError as e:
            raise CheckFailed(f'RawBatch.to waits for the GPU while applying the ops: {e}') from None
        finally:
            torch.cuda.set_sync_debug_mode('default')
        sync(device)
    left = sum(bool(ops) for ops in batches['ops_on_device'].ops)
    encoded = sum(e is not None for e in batches['decode_on_device'].encoded)
    if not torch.equal(finished['in_worker'], finished['ops_on_device']):
        raise CheckFailed(f'RandAugment ops applied on {device} differ from Pillow\'s in the worker')
    psnr = _psnr(finished['in_worker'], finished['decode_on_device'])
    if device.type == 'cpu' and psnr != float('inf'):
        raise CheckFailed(f'decoding left to the CPU differs from the worker\'s ({psnr:.1f} dB)')
    if psnr < 35:
        raise CheckFailed(f'decoding on {device}: PSNR {psnr:.1f} dB against the worker\'s decode (bound 35)')
    summary = (f'{count} photos: {left} with the flip or RandAugment ops left to the device, identical; '
               f'{encoded} decoded there, PSNR {psnr:.1f} dB; RawBatch.to ms/image: ' +
               ', '.join(f'{k} {v:.3f}' for k, v in finish_ms.items()) +
               '; of which the training process queueing it: ' +
               ', '.join(f'{k} {v:.3f}' for k, v in launch_ms.items()) + '; worker CPU ms/image: ' +
               ', '.join(f'{k} {v:.2f}' for k, v in worker_ms.items()))
    return {'summary': summary, 'images': count, 'ops_left_to_device': left, 'decoded_on_device': encoded,
            'psnr_decode_db': psnr, 'finish_ms_per_image': finish_ms, 'launch_ms_per_image': launch_ms,
            'worker_cpu_ms_per_image': worker_ms}


# ---------------------------------------------------------------------------------------------------
# The run and the report
# ---------------------------------------------------------------------------------------------------

RUNNERS: Dict[str, Callable[[dict, Path], dict]] = {
    'train': check_train, 'ddp': check_ddp, 'fused': check_fused, 'compile': check_compile,
    'visualize': check_visualize, 'benchmark': check_benchmark, 'pipeline': check_pipeline}


def environment(device: torch.device) -> dict:
    import platform
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        commit, dirty = '', ''
    from tools.benchmark import cpu_model
    env = {'device': torch.cuda.get_device_name(0) if device.type == 'cuda' else cpu_model(),
           'torch': torch.__version__, 'cuda': torch.version.cuda, 'python': platform.python_version(),
           'commit': commit + (' (uncommitted changes)' if dirty else ''),
           'date': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    if device.type == 'cuda':
        env['gpus'] = torch.cuda.device_count()
        env['bf16'] = torch.cuda.is_bf16_supported()
    try:
        import triton
        env['triton'] = triton.__version__
    except ImportError:
        env['triton'] = None
    import timm
    env['timm'] = timm.__version__
    return env


def write_report(path: Path, mode_name: str, env: dict, results: List[dict]):
    lines = [f'# GPU check ({mode_name})', '', '`bash benchmarks/gpu_check.sh ' + ' '.join(sys.argv[1:]) + '`', '']
    lines += [f'- {k}: {v}' for k, v in env.items()] + ['', '| check | result | seconds | detail |',
                                                         '|---|---|---:|---|']
    for r in results:
        detail = r.get('summary') or r.get('error', '')
        lines.append(f'| {r["check"]} | {r["status"]} | {r["seconds"]:.1f} | {detail.replace("|", "/")} |')
    path.with_suffix('.md').write_text('\n'.join(lines) + '\n')
    path.with_suffix('.json').write_text(json.dumps({'mode': mode_name, 'environment': env, 'checks': results},
                                                    indent=1, default=str) + '\n')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--cpu', action='store_true', help='run every check on the CPU, small (no CUDA needed)')
    p.add_argument('--only', nargs='+', choices=CHECKS, metavar='CHECK',
                   help=f'run only these checks ({", ".join(CHECKS)})')
    p.add_argument('--out', type=Path, help='folder for the report and results (default: benchmarks/, '
                                            'or benchmarks/tmp/gpu_check_cpu with --cpu)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print('error: no CUDA device here; bash benchmarks/gpu_check.sh --cpu runs the checks that do not '
              'need one', file=sys.stderr)
        return 2
    logging.getLogger('focalnet').setLevel(logging.WARNING)  # main.py's per-step lines
    mode = settings(args.cpu)
    if args.cpu:
        # The CPU checks are tiny: one thread each, in this process and the ones it starts, is faster
        # than a thread pool (whose idle threads spin) and leaves the other cores to others.
        torch.set_num_threads(1)
        os.environ['OMP_NUM_THREADS'] = '1'

    out = args.out or (ROOT / 'benchmarks' / ('tmp/gpu_check_cpu' if args.cpu else ''))
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix='gpu_check_', dir=out if args.cpu else None))
    env = environment(mode['device'])
    mode_name = 'cpu' if args.cpu else gpu_slug()
    print(f'GPU check, {"CPU mode" if args.cpu else "CUDA"}: {env["device"]}, torch {env["torch"]}, '
          f'commit {env["commit"]}', flush=True)
    results = []
    for name in args.only or CHECKS:
        start = time.perf_counter()
        # Benchmark tables are results and go next to the report; everything else is scratch.
        where = out if name == 'benchmark' and not args.cpu else scratch
        try:
            details = RUNNERS[name](mode, where)
            status = 'PASS'
        except CheckFailed as e:
            details, status = {'error': str(e)}, 'FAIL'
        except CheckSkipped as e:
            details, status = {'error': str(e)}, 'SKIP'
        except Exception as e:  # noqa: BLE001 -- a crash in one check must not hide the others' results
            details = {'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc()[-4000:]}
            status = 'FAIL'
        seconds = time.perf_counter() - start
        results.append({'check': name, 'status': status, 'seconds': round(seconds, 1), **details})
        line = details.get('summary') or details['error'].splitlines()[0]
        print(f'{status} {name} ({seconds:.0f}s): {line}', flush=True)
        if status == 'FAIL' and '\n' in details['error']:
            print('    ' + details['error'].replace('\n', '\n    '), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    report = out / f'gpu_check_{mode_name}'
    write_report(report, mode_name, env, results)
    failed = [r['check'] for r in results if r['status'] == 'FAIL']
    skipped = [r['check'] for r in results if r['status'] == 'SKIP']
    passed = len(results) - len(failed) - len(skipped)
    print(f'{passed} of {len(results)} checks passed' + (f'; failed: {", ".join(failed)}' if failed else '')
          + (f'; skipped: {", ".join(skipped)}' if skipped else '') + f'. Report: {report}.md', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
