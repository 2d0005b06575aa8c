"""The ImageNet table's cost columns, and speed side by side with other FocalNet implementations.

    python tools/benchmark.py --table [--throughput] [--json rows.json] [--markdown table.md]
    python tools/benchmark.py --compare timm --models focalnet_tiny_srf --device cuda --amp bf16
    python tools/benchmark.py --compare hf --device cpu --threads 2 --batch-size 8
    python tools/benchmark.py --pipeline [--data-path DIR] [--workers 1 2] [--json rows.json]

``--table`` prints parameters (M) and FLOPs (G, multiply-adds at 224 px, as the paper counts them) for
the nine ImageNet-1K models next to the paper's values, and with ``--throughput`` images/s measured here.
``--table detection`` prints the detection table's cost columns: Mask R-CNN with FocalNet-T/S/B, kernels
[9,11] and [9,11,13], at 1280x800 (detection/cost.py), next to the official README's values.
``--compare`` builds the same architecture in this codebase and in timm (``timm``) or Hugging Face
transformers (``hf``), copies one set of weights into both, checks that they agree, then times inference
and a training step (forward, cross-entropy, backward, SGD step) in alternating rounds in one process.
``--pipeline`` times the training input pipeline, timm's transform against ours (data/fast_transform.py),
in images/s per loader core (tools/pipeline_benchmark.py).
The official implementation is not installable; transformers' FocalNet is a port of it that keeps its
permute-and-copy structure, so ``hf`` stands in for the official implementation.
"""
import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import FocalNet, create_model, list_models  # noqa: E402
from models.cost import count_flops, count_params  # noqa: E402
from models.pretrained import to_hf  # noqa: E402

TABLE_MODELS = [
    'focalnet_tiny_srf', 'focalnet_tiny_lrf', 'focalnet_small_srf', 'focalnet_small_lrf',
    'focalnet_base_srf', 'focalnet_base_lrf', 'focalnet_tiny_iso', 'focalnet_small_iso',
    'focalnet_base_iso',
]
DEFAULT_REFERENCE = ROOT.parent / 'shared' / 'reference' / 'imagenet1k_table.csv'
# The paper's ImageNet-1K table (params M, GFLOPs, V100 imgs/s at batch 128, top-1 %), used when the
# reference CSV is not found.
PAPER_TABLE = {
    'focalnet_tiny_srf': (28.4, 4.4, 743, 82.1),
    'focalnet_tiny_lrf': (28.6, 4.5, 696, 82.3),
    'focalnet_small_srf': (49.9, 8.6, 434, 83.4),
    'focalnet_small_lrf': (50.3, 8.7, 406, 83.5),
    'focalnet_base_srf': (88.1, 15.3, 280, 83.7),
    'focalnet_base_lrf': (88.7, 15.4, 269, 83.9),
    'focalnet_tiny_iso': (5.9, 1.1, 2334, 74.1),
    'focalnet_small_iso': (22.4, 4.3, 920, 80.9),
    'focalnet_base_iso': (87.2, 16.9, 300, 82.4),
}
BASE_ISO_NOTE = ('focalnet_base_iso: the released weights carry a layer norm inside each modulation '
                 '(12 x 2 x 768 = 18,432 parameters) that the paper\'s count omits.')
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class UsageError(Exception):
    """A bad option value; reported as one line, without a traceback."""


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ---- the paper's table ---------------------------------------------------------------------------

def read_paper_table(path: Optional[Path]) -> Tuple[Dict[str, dict], str]:
    """The paper's values per model, from the reference CSV when present, else the built-in copy."""
    path = Path(path) if path else DEFAULT_REFERENCE
    if path.is_file():
        rows = {}
        for r in csv.DictReader(path.open()):
            rows[r['config']] = dict(params_m=float(r['params_m']), gflops=float(r['gflops']),
                                     throughput=float(r['throughput_v100_imgs_s']), top1=float(r['top1']))
        return rows, str(path)
    rows = {k: dict(params_m=p, gflops=g, throughput=t, top1=a) for k, (p, g, t, a) in PAPER_TABLE.items()}
    return rows, 'built-in copy of the paper\'s table (reference CSV not found)'


def cost_row(name: str, img_size: int) -> dict:
    with torch.device('meta'):  # counting needs shapes only
        model = create_model(name)
    return dict(config=name, params_m=count_params(model) / 1e6,
                gflops=count_flops(model, img_size) / 1e9)


# ---- timing ---------------------------------------------------------------------------------------

def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Runner:
    """One implementation's inference and training steps under the chosen precision and layout."""

    def __init__(self, name: str, model: nn.Module, args, device: torch.device, compile: bool):
        self.name = name
        self.device = device
        self.amp_dtype = AMP_DTYPES[args.amp]
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module = model
        self.model = torch.compile(model) if compile else model
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # Plain SGD keeps no state, so peak memory is activations, gradients and weights alone.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def infer(self, x, y):
        self.module.eval()
        with torch.inference_mode(), self.autocast():
            self.model(x)

    def train(self, x, y):
        self.module.train()
        with self.autocast():
            loss = F.cross_entropy(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def time_steps(step: Callable, x, y, iters: int, device: torch.device,
               clock: str = 'wall') -> Tuple[float, Optional[float]]:
    """Images per second over ``iters`` steps, and the peak memory (MiB) the steps added on CUDA.

    With ``clock='cpu'`` the seconds are this process's CPU seconds (all threads), which other
    processes on a shared machine disturb far less than wall time: images per CPU-second.
    """
    timer = time.process_time if clock == 'cpu' else time.perf_counter
    sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = timer()
    for _ in range(iters):
        step(x, y)
    sync(device)
    elapsed = timer() - start
    peak = None
    if device.type == 'cuda':
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    return iters * x.shape[0] / elapsed, peak


def summarise(values: List[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), all=values)


def benchmark(runners: List[Runner], args, device, modes=('infer', 'train')) -> Dict[str, dict]:
    """Warm every runner up, then time them in alternating rounds; medians over rounds."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    results = {r.name: {m: [] for m in modes} for r in runners}
    peaks = {r.name: {m: 0. for m in modes} for r in runners}
    for mode in modes:
        for r in runners:
            step = getattr(r, mode)
            for _ in range(args.warmup):
                step(x, y)
        for _ in range(args.rounds):
            for r in runners:
                rate, peak = time_steps(getattr(r, mode), x, y, args.iters, device, args.clock)
                results[r.name][mode].append(rate)
                if peak is not None:  # what the steps added, plus this runner's own weights
                    peaks[r.name][mode] = max(peaks[r.name][mode], peak + r.param_bytes / 2 ** 20)
    out = {}
    for r in runners:
        out[r.name] = {}
        for mode in modes:
            out[r.name][mode] = summarise(results[r.name][mode])
            out[r.name][mode]['peak_mib'] = peaks[r.name][mode] if device.type == 'cuda' else None
    return out


# ---- the same weights in timm and Hugging Face transformers ----------------------------------------

def architecture(model: FocalNet) -> dict:
    """The constructor choices of a FocalNet, read back from its modules."""
    blocks = [stage.blocks[0] for stage in model.layers]
    mods = [b.modulation for b in blocks]
    return dict(
        embed_dim=model.dims[0], depths=[len(s.blocks) for s in model.layers],
        patch_size=model.patch_embed.patch_size, num_classes=model.num_classes,
        mlp_ratio=blocks[0].mlp.fc1.out_features / blocks[0].modulation.dim,
        focal_levels=[m.focal_level for m in mods], focal_windows=[m.kernel_sizes[0] for m in mods],
        focal_factors=[(m.kernel_sizes[1] - m.kernel_sizes[0]) if m.focal_level > 1 else 2 for m in mods],
        use_conv_embed=model.patch_embed.proj.kernel_size[0] == 7,
        use_layerscale=blocks[0].gamma_1 is not None,
        layerscale_value=1e-4 if blocks[0].gamma_1 is not None else None,  # weights are copied after
        use_postln=blocks[0].use_postln, use_postln_in_modulation=hasattr(mods[0], 'ln'),
        normalize_modulator=mods[0].normalize_modulator)


def timm_twin(model: FocalNet, drop_path_rate: float) -> nn.Module:
    import timm.models.focalnet as tf
    a = architecture(model)
    if a['patch_size'] != 4 or len(a['depths']) < 2:
        raise UsageError('timm implements only the multi-stage FocalNets (stride-4 stem); '
                         'compare the isotropic models with --compare hf')
    if any(f != 2 for f in a['focal_factors']):
        raise UsageError(f'timm fixes the focal factor at 2; this model uses {a["focal_factors"]}')
    twin = tf.FocalNet(
        embed_dim=a['embed_dim'], depths=tuple(a['depths']), num_classes=a['num_classes'],
        mlp_ratio=a['mlp_ratio'], focal_levels=tuple(a['focal_levels']),
        focal_windows=tuple(a['focal_windows']), use_overlap_down=a['use_conv_embed'],
        use_post_norm=a['use_postln'], use_post_norm_in_modulation=a['use_postln_in_modulation'],
        normalize_modulator=a['normalize_modulator'],
        layerscale_value=a['layerscale_value'] if a['use_layerscale'] else None,
        drop_path_rate=drop_path_rate)
    # timm's own converter for the official layout (ours is that layout).
    state = tf.checkpoint_filter_fn(model.state_dict(), twin)
    twin.load_state_dict(state, strict=True)
    return twin


class HFLogits(nn.Module):
    """transformers' image classifier returning bare logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def hf_twin(model: FocalNet, drop_path_rate: float) -> nn.Module:
    from transformers import FocalNetConfig, FocalNetForImageClassification
    a = architecture(model)
    if any(f != 2 for f in a['focal_factors']):
        raise UsageError(f'transformers fixes the focal factor at 2; this model uses {a["focal_factors"]}')
    config = FocalNetConfig(
        image_size=model.img_size, patch_size=a['patch_size'], embed_dim=a['embed_dim'],
        depths=a['depths'], focal_levels=a['focal_levels'], focal_windows=a['focal_windows'],
        mlp_ratio=a['mlp_ratio'], use_conv_embed=a['use_conv_embed'],
        use_layerscale=a['use_layerscale'], layerscale_value=a['layerscale_value'] or 1e-4,
        use_post_layernorm=a['use_postln'], use_post_layernorm_in_modulation=a['use_postln_in_modulation'],
        normalize_modulator=a['normalize_modulator'], num_labels=a['num_classes'],
        drop_path_rate=drop_path_rate, hidden_dropout_prob=0.)
    twin = FocalNetForImageClassification(config)
    twin.load_state_dict(to_hf(model.state_dict()), strict=True)
    return HFLogits(twin)


TWINS = {'timm': timm_twin, 'hf': hf_twin}


def check_same_outputs(ours: nn.Module, twin: nn.Module, img_size: int, label: str):
    """Refuse to time two models that do not compute the same function."""
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    ours.eval(), twin.eval()
    with torch.no_grad():
        a, b = ours(x), twin(x)
    err = ((a - b).norm() / b.norm()).item()
    if not err < 1e-4:
        raise RuntimeError(f'{label}: outputs differ from ours (relative error {err:.2e}); not timing')
    return err


# ---- commands ------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += ' (with uncommitted changes)'
    except (OSError, subprocess.CalledProcessError):
        commit = 'unknown'
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        name = f'CPU ({cpu_model()}), {torch.get_num_threads()} threads'
    return dict(device=name, torch_version=torch.__version__, commit=commit)


def cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings(args) -> dict:
    return dict(batch_size=args.batch_size, img_size=args.img_size, amp=args.amp,
                channels_last=args.channels_last, compile=args.compile or 'none', clock=args.clock)


def rate_unit(args) -> str:
    return 'images/CPU-s' if args.clock == 'cpu' else 'images/s'


def fmt(v, spec='.1f'):
    return '-' if v is None else format(v, spec)


def run_table(args, device) -> Tuple[List[dict], List[str]]:
    paper, source = read_paper_table(args.reference)
    env = environment(device)
    rows, lines = [], []
    for name in args.models:
        log(f'[table] {name}')
        row = cost_row(name, args.img_size)
        row['throughput_imgs_s'] = None
        if args.throughput:
            torch.manual_seed(0)
            runner = Runner('ours', create_model(name), args, device, args.compile is not None)
            timing = benchmark([runner], args, device, modes=('infer',))
            row['throughput_imgs_s'] = timing['ours']['infer']['median']
            del runner
            log(f'[table] {name}: {row["throughput_imgs_s"]:.1f} {rate_unit(args)}')
        p = paper.get(name, {})
        row.update(paper_params_m=p.get('params_m'), paper_gflops=p.get('gflops'),
                   paper_throughput_imgs_s=p.get('throughput'), paper_top1=p.get('top1'),
                   **settings(args), **env)
        rows.append(row)
    lines.append(f'Device: {env["device"]}; torch {env["torch_version"]}; commit {env["commit"]}')
    lines.append(f'Paper values: {source}. FLOPs are multiply-adds at {args.img_size} px; paper '
                 'throughput is one V100 at batch 128.')
    if args.throughput:
        lines.append(f'Measured: inference, batch {args.batch_size}, amp {args.amp}, '
                     f'channels_last {args.channels_last}, compile {args.compile or "none"}, '
                     f'{args.clock} clock; median of {args.rounds} rounds of {args.iters} steps.')
    lines.append('')
    lines.append(f'| model | params (M) | paper | GFLOPs | paper | {rate_unit(args)} (here) | '
                 'images/s (paper, V100) | top-1 (paper) |')
    lines.append('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        mark = '*' if r['config'] == 'focalnet_base_iso' else ''
        lines.append(f'| {r["config"]} | {r["params_m"]:.1f}{mark} | {fmt(r["paper_params_m"])} | '
                     f'{r["gflops"]:.1f} | {fmt(r["paper_gflops"])} | {fmt(r["throughput_imgs_s"], ".0f")} | '
                     f'{fmt(r["paper_throughput_imgs_s"], ".0f")} | {fmt(r["paper_top1"])} |')
    if 'focalnet_base_iso' in args.models:
        lines.append('')
        lines.append(f'\\* {BASE_ISO_NOTE}')
    return rows, lines


def released_evaluations(paths) -> Dict[str, dict]:
    """The evaluations of released checkpoints (``python -m detection --eval --pretrained <file>``
    records {'mode': 'eval', 'model': <MODEL.NAME>, 'checkpoint', 'bbox_ap', 'segm_ap', ...} in its
    metrics.jsonl), by model name; the last record of a name wins."""
    found = {}
    for path in paths or ():
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise UsageError(f'--released-evals {path}: cannot read it ({e.strerror})') from None
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f'--released-evals {path}: line {number} is not JSON') from None
            if record.get('mode') == 'eval' and record.get('model') and record.get('released'):
                found[record['model']] = record
    return found


def _ours(evals: Dict[str, dict], name: str) -> Tuple[Optional[float], Optional[float], str]:
    record = evals.get(name)
    if record is None:
        return None, None, ''
    return record.get('bbox_ap'), record.get('segm_ap'), record.get('checkpoint', '')


def run_detection_table(args, device) -> Tuple[List[dict], List[str]]:
    """Parameters and FLOPs of the Mask R-CNN rows of the official README's detection table, and
    their box / mask mAP: the paper's, and ours where a released checkpoint was evaluated here."""
    from config import load_config
    from detection.cost import PAPER_MASK_RCNN, detector_cost
    env = environment(device)
    evals = released_evaluations(args.released_evals)
    rows = []
    for name, paper in PAPER_MASK_RCNN.items():
        log(f'[table detection] {name}')
        config = load_config(str(ROOT / 'configs' / 'detection' / f'{name}_1x.yaml'))
        cost = detector_cost(config)
        rows.append(dict(config=name, kernels=paper['kernels'], params_m=cost['params'] / 1e6,
                         gflops=cost['gflops'], backbone_params_m=cost['backbone_params'] / 1e6,
                         backbone_gflops=cost['backbone_gflops'], img_size=[800, 1280],
                         paper_params_m=paper['params_m'], paper_gflops=paper['gflops'],
                         paper_box_map_1x=paper['box_map'][0], paper_mask_map_1x=paper['mask_map'][0],
                         paper_box_map_3x=paper['box_map'][1], paper_mask_map_3x=paper['mask_map'][1],
                         commit=env['commit']))
        for schedule in ('1x', '3x'):
            box, mask, checkpoint = _ours(evals, f'{name}_{schedule}')
            rows[-1].update({f'ours_box_map_{schedule}': box, f'ours_mask_map_{schedule}': mask,
                             f'ours_checkpoint_{schedule}': checkpoint or None})
    lines = [f'commit {env["commit"]}. Mask R-CNN (torchvision) with FPN, 80 classes, at 1280x800; FLOPs are '
             'multiply-adds with the box head on 1000 RoIs and the mask head on 100, as mmdetection\'s '
             'get_flops runs it. Paper: the official FocalNet README (mmdetection). Ours: COCO val2017 '
             'bbox / segm AP of the released checkpoint evaluated here with python -m detection --eval '
             '--pretrained <file> (records given by --released-evals); "-" where none was evaluated.', '',
             '| backbone | kernels | params (M) | paper | GFLOPs | paper | backbone params (M) | '
             'backbone GFLOPs | box / mask mAP 1x (paper) | ours | 3x (paper) | ours |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']

    def ours(r, schedule):
        box, mask = r[f'ours_box_map_{schedule}'], r[f'ours_mask_map_{schedule}']
        return '-' if box is None else f'{box:.1f} / {mask:.1f}' if mask is not None else f'{box:.1f} / -'
    for r in rows:
        lines.append(f'| {r["config"]} | {r["kernels"]} | {r["params_m"]:.1f} | {r["paper_params_m"]:.1f} | '
                     f'{r["gflops"]:.0f} | {r["paper_gflops"]:.0f} | {r["backbone_params_m"]:.2f} | '
                     f'{r["backbone_gflops"]:.1f} | {r["paper_box_map_1x"]} / {r["paper_mask_map_1x"]} | '
                     f'{ours(r, "1x")} | {r["paper_box_map_3x"]} / {r["paper_mask_map_3x"]} | {ours(r, "3x")} |')
    if not evals:
        lines += ['', 'No released checkpoint has been evaluated here (none can be downloaded in this '
                  'environment): the "ours" columns are empty until --released-evals names the metrics.jsonl '
                  'of such evaluations.']
    other_rows, other_lines = other_detection_rows(env)
    return rows + other_rows, lines + other_lines


def other_detection_rows(env) -> Tuple[List[dict], List[str]]:
    """The README's other detection methods (FocalNet-T [11,9,9,7], 3x) that this codebase builds."""
    from config import load_config
    from detection.cost import PAPER_OTHER_METHODS, detector_cost
    from detection.model import METHODS
    rows = []
    for name, paper in PAPER_OTHER_METHODS.items():
        if name.split('_focalnet')[0] not in METHODS:
            continue
        log(f'[table detection] {name}')
        cost = detector_cost(load_config(str(ROOT / 'configs' / 'detection' / f'{name}.yaml')))
        rows.append(dict(config=name, method=paper['method'], kernels='[11,9,9,7]', params_m=cost['params'] / 1e6,
                         gflops=cost['gflops'], backbone_params_m=cost['backbone_params'] / 1e6,
                         backbone_gflops=cost['backbone_gflops'], img_size=[800, 1280],
                         paper_params_m=paper['params_m'], paper_gflops=paper['gflops'],
                         paper_box_map_3x=paper['box_map'], commit=env['commit']))
    lines = ['', 'Other detection methods (written with mmdetection\'s names, detection/atss.py ...), '
             'FocalNet-T with focal windows [11,9,9,7] and 3 focal levels, 3x schedule, at 1280x800.', '',
             '| method | params (M) | paper | GFLOPs | paper | backbone params (M) | backbone GFLOPs | '
             'box mAP 3x (paper) |', '|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f'| {r["method"]} | {r["params_m"]:.2f} | {r["paper_params_m"]:.1f} | {r["gflops"]:.1f} | '
                     f'{r["paper_gflops"]:.0f} | {r["backbone_params_m"]:.2f} | {r["backbone_gflops"]:.1f} | '
                     f'{r["paper_box_map_3x"]} |')
    return rows, lines


def run_compare(args, device) -> Tuple[List[dict], List[str]]:
    env = environment(device)
    rows, lines = [], []
    lines.append(f'Device: {env["device"]}; torch {env["torch_version"]}; commit {env["commit"]}')
    lines.append(f'Batch {args.batch_size}, {args.img_size} px, amp {args.amp}, channels_last '
                 f'{args.channels_last}, compile {args.compile or "none"}; {args.rounds} alternating '
                 f'rounds of {args.iters} steps after {args.warmup} warm-up steps; median [min-max] images per '
                 f'{"CPU-" if args.clock == "cpu" else ""}second. '
                 'Training step: forward, cross-entropy, backward, SGD step.')
    if args.compare == 'hf':
        lines.append('hf: transformers\' FocalNet, a port of the official implementation (which is not '
                     'installable) with its permute-and-copy structure; it stands in for the official code.')
    for name in args.models:
        log(f'[compare {args.compare}] {name}: building and checking outputs')
        torch.manual_seed(0)
        ours = create_model(name, drop_path_rate=args.drop_path)
        twin = TWINS[args.compare](ours, args.drop_path)
        err = check_same_outputs(ours, twin, min(args.img_size, 64), f'{args.compare} {name}')
        runners = [Runner('ours', ours, args, device, args.compile in ('both', 'ours')),
                   Runner(args.compare, twin, args, device, args.compile in ('both', 'other'))]
        log(f'[compare {args.compare}] {name}: timing (outputs agree, relative error {err:.1e})')
        res = benchmark(runners, args, device)
        for impl in ('ours', args.compare):
            r = res[impl]
            other = res['ours' if impl != 'ours' else args.compare]
            rows.append(dict(
                config=name, impl=impl, infer_imgs_s=r['infer']['median'], infer_runs=r['infer']['all'],
                train_imgs_s=r['train']['median'], train_runs=r['train']['all'],
                infer_peak_mib=r['infer']['peak_mib'], train_peak_mib=r['train']['peak_mib'],
                infer_ratio_vs_other=r['infer']['median'] / other['infer']['median'],
                train_ratio_vs_other=r['train']['median'] / other['train']['median'],
                output_rel_err=err, threads=torch.get_num_threads(), **settings(args), **env))
        o, t = res['ours'], res[args.compare]
        lines += ['', f'**{name}**', '',
                  f'| | ours | {args.compare} | ours / {args.compare} |', '|---|---:|---:|---:|']
        for mode, label in (('infer', f'inference {rate_unit(args)}'),
                            ('train', f'training {rate_unit(args)}')):
            lines.append(f'| {label} | {o[mode]["median"]:.1f} [{o[mode]["min"]:.1f}-{o[mode]["max"]:.1f}] | '
                         f'{t[mode]["median"]:.1f} [{t[mode]["min"]:.1f}-{t[mode]["max"]:.1f}] | '
                         f'{o[mode]["median"] / t[mode]["median"]:.2f} |')
        if device.type == 'cuda':
            for mode in ('infer', 'train'):
                lines.append(f'| peak {mode} memory (MiB) | {o[mode]["peak_mib"]:.0f} | '
                             f'{t[mode]["peak_mib"]:.0f} | '
                             f'{o[mode]["peak_mib"] / t[mode]["peak_mib"]:.2f} |')
        del runners, ours, twin
    return rows, lines


# ---- the ADE20K table (segmentation/cost.py counts) -----------------------------------------------

def segmentation_table_args(args):
    from segmentation.cost import PAPER_ADE20K
    args.models = args.models or list(PAPER_ADE20K)
    unknown = [m for m in args.models if not (ROOT / 'configs' / 'segmentation' / f'{m}.yaml').is_file()]
    if unknown:
        raise UsageError(f'no segmentation config for {", ".join(unknown)}; known: {", ".join(PAPER_ADE20K)}')
    if args.throughput:
        raise UsageError('--throughput goes with the ImageNet table')
    return args


def run_segmentation_table(args, device) -> Tuple[List[dict], List[str]]:
    from segmentation.cost import table_lines, table_rows
    env = environment(device)
    rows = [dict(row, **env) for row in table_rows(args.models, ROOT)]
    return rows, [f'torch {env["torch_version"]}; commit {env["commit"]}'] + table_lines(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('--table', nargs='?', const='imagenet',
                      choices=('imagenet', 'detection', 'segmentation'),
                      help='a table\'s cost columns: imagenet (the default), detection (Mask R-CNN '
                           'at 1280x800) or segmentation (ADE20K UPerNet)')
    what.add_argument('--compare', choices=sorted(TWINS), help='time ours against another implementation')
    what.add_argument('--pipeline', action='store_true',
                      help='time the training input pipeline: timm\'s transform and ours, per loader core')
    p.add_argument('--data-path', help='with --pipeline: an ImageFolder (or a root with train/) to read '
                                       '(default: JPEGs made from the bundled photos)')
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2],
                   help='with --pipeline: loader worker counts to time (default 1 2)')
    p.add_argument('--images', type=int, default=512,
                   help='with --pipeline: JPEGs to make from the bundled photos (default 512)')
    p.add_argument('--photo-sides', type=int, nargs=2, default=[250, 500], metavar=('MIN', 'MAX'),
                   help='with --pipeline: widths and heights of the JPEGs made from the bundled photos '
                        '(default 250 500, ImageNet-like)')
    p.add_argument('--gpu-rate', type=float, default=3000,
                   help='with --pipeline: training images/s per GPU for the cores-needed column '
                        '(default 3000)')
    p.add_argument('--gpus', type=int, default=8, help='with --pipeline: GPUs per node (default 8)')
    p.add_argument('--opts', nargs='+', default=[], help='with --pipeline: config KEY VALUE pairs '
                                                         '(default: the release recipe)')
    p.add_argument('--throughput', action='store_true', help='with --table: measure inference images/s')
    p.add_argument('--released-evals', nargs='+', metavar='JSONL',
                   help='with --table detection: metrics.jsonl files of python -m detection --eval '
                        '--pretrained <released checkpoint> runs, for the "ours" mAP columns')
    p.add_argument('--models', nargs='+', help='model names (default: the nine ImageNet-1K models; '
                                                'with --compare, focalnet_tiny_srf)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int, help='default 128 (32 with --pipeline)')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp', choices=sorted(AMP_DTYPES), default='none')
    p.add_argument('--compile', nargs='?', const='both', choices=('both', 'ours', 'other'),
                   help='torch.compile the timed models: both (the default when given without a '
                        'value), only ours, or only the other implementation (--compare)')
    p.add_argument('--channels-last', action='store_true', help='channels-last inputs and weights')
    p.add_argument('--threads', type=int, help='CPU threads (torch.set_num_threads)')
    p.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                   help='cpu: time by this process\'s CPU seconds (images per CPU-second), for a CPU '
                        'shared with other work; set OMP_WAIT_POLICY=PASSIVE so that idle threads do '
                        'not spin')
    p.add_argument('--warmup', type=int, default=5, help='untimed steps per model and mode')
    p.add_argument('--iters', type=int, default=20, help='timed steps per round')
    p.add_argument('--rounds', type=int, default=3, help='alternating timing rounds')
    p.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate (--compare)')
    p.add_argument('--reference', type=Path, help=f'the paper\'s table (default {DEFAULT_REFERENCE})')
    p.add_argument('--json', type=Path, help='write the rows as JSON')
    p.add_argument('--markdown', type=Path, help='write the printed report as markdown')
    p.add_argument('--quick', action='store_true',
                   help='a fast smoke run: 64 px, batch 2, one warm-up step, one round of one step '
                        '(with --pipeline: 48 photos, batch 8, one round)')
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 32 if args.pipeline else 128
    if args.pipeline:
        if args.quick:  # a smoke run: 48 photos, batches of 8, one timed round
            args.images, args.batch_size, args.rounds = 48, 8, 1
        return pipeline_args(args)
    if args.quick:
        args.img_size, args.batch_size, args.warmup, args.iters, args.rounds = 64, 2, 1, 1, 1
    if args.table == 'segmentation':
        return segmentation_table_args(args)
    if args.models is None:
        args.models = TABLE_MODELS if args.table else ['focalnet_tiny_srf']
    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        raise UsageError(f'unknown model(s) {", ".join(unknown)}; known: {", ".join(list_models())}')
    for opt in ('batch_size', 'img_size', 'iters', 'rounds'):
        if getattr(args, opt) < 1:
            raise UsageError(f'--{opt.replace("_", "-")} must be at least 1, got {getattr(args, opt)}')
    if not 32 <= args.img_size <= 4096:  # DATA.IMG_SIZE's range (config.py)
        raise UsageError(f'--img-size must be from 32 to 4096, got {args.img_size}')
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise UsageError(f'--warmup must be 0 or more and --threads at least 1; got {args.warmup}, {args.threads}')
    if not 0 <= args.drop_path < 1:  # False for NaN too
        raise UsageError(f'--drop-path must be in [0, 1), got {args.drop_path}')
    for flag in ('json', 'markdown'):  # written at the end: checked before the timing starts
        if getattr(args, flag) is not None and getattr(args, flag).is_dir():
            raise UsageError(f'--{flag} {getattr(args, flag)} is a folder; give a file name')
    if args.clock == 'cpu' and args.device.startswith('cuda'):
        raise UsageError('--clock cpu times CPU work; CUDA runs use the wall clock')
    if args.throughput and args.table != 'imagenet':
        raise UsageError('--throughput goes with --table (the ImageNet table)')
    return args


def pipeline_args(args):
    if args.data_path and not os.path.isdir(args.data_path):
        raise UsageError(f'--data-path {args.data_path}: no such folder')
    for name in ('batch_size', 'images', 'rounds', 'gpus'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    bad = [n for n in args.workers if n < 0]
    if bad:
        raise UsageError(f'--workers must be 0 or more, got {bad[0]}')
    if not 1 <= args.photo_sides[0] <= args.photo_sides[1]:
        raise UsageError(f'--photo-sides needs 1 <= MIN <= MAX, got {args.photo_sides[0]} {args.photo_sides[1]}')
    if args.gpu_rate <= 0:
        raise UsageError(f'--gpu-rate must be positive, got {args.gpu_rate}')
    return args


def run_pipeline(args, device) -> Tuple[List[dict], List[str]]:
    from errors import UserError
    from tools.pipeline_benchmark import run_pipeline as run
    try:
        rows, lines = run(args.data_path, args.workers, args.rounds, args.batch_size, args.images,
                          args.gpu_rate, args.gpus, args.opts, sides=tuple(args.photo_sides))
    except (UserError, ValueError) as e:
        raise UsageError(str(e)) from None
    env = environment(torch.device('cpu'))
    env['device'] = f'CPU ({cpu_model()}), one thread per loader process'
    return [dict(row, **env) for row in rows], \
        [f'{env["device"]}; torch {env["torch_version"]}; commit {env["commit"]}'] + lines


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f'--device {args.device!r} is not a device torch knows') from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise UsageError(f'--device {args.device}: CUDA is not available here')
        if args.amp == 'fp16' and device.type == 'cpu':
            raise UsageError('--amp fp16 needs a GPU; use bf16 on the CPU')
        if args.threads:
            torch.set_num_threads(args.threads)
        run = run_pipeline if args.pipeline else {
            'imagenet': run_table, 'detection': run_detection_table,
            'segmentation': run_segmentation_table, None: run_compare}[args.table]
        rows, lines = run(args, device)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    text = '\n'.join(lines)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + '\n')
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        command = 'python tools/benchmark.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
        if os.environ.get('OMP_WAIT_POLICY'):
            command = f'OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]} {command}'
        args.markdown.write_text(f'`{command}`\n\n{text}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
