"""The fused context aggregation (Triton kernels, run by Triton's CPU interpreter) against the plain path.

Triton decides at import whether kernels are interpreted, so the comparison runs in a child process
started with ``TRITON_INTERPRET=1``; each test checks one case of what it reports.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import create_model, fused
from models.focalnet import FocalModulation

ROOT = Path(__file__).resolve().parents[1]

# (name, dim, focal levels, focal window, normalize_modulator, dtype, (B, H, W)); the kernels' blocks
# are 16 columns by 64 channels.
CASES = [
    ('srf', 8, 2, 3, False, 'float32', (2, 4, 9)),  # the small receptive field models
    ('lrf_wide', 70, 3, 3, False, 'float32', (1, 3, 19)),  # two blocks each way; kernels 3, 5, 7
    ('one_level_norm', 8, 1, 7, True, 'float32', (2, 4, 9)),  # one 7x7 level, normalised modulator
    ('srf_bf16', 16, 2, 3, False, 'bfloat16', (1, 4, 9)),
]
TENSORS = ['output', 'grad ctx', 'grad gates', 'grad weight 0', 'grad weight 1', 'grad weight 2']


def modulate_inputs(mod: FocalModulation, dtype, B=2, H=4, W=9):
    """ctx and gates as modulate() makes them: strided slices of one projection, NCHW views of BHWC."""
    C, L = mod.dim, mod.focal_level
    proj = torch.randn(B, H, W, 2 * C + L + 1).to(dtype)
    ctx = proj[..., C:2 * C].permute(0, 3, 1, 2).detach().requires_grad_()
    gates = proj[..., 2 * C:].permute(0, 3, 1, 2).detach().requires_grad_()
    return ctx, gates


def compare_case(dim, levels, window, normalize, dtype_name, shape) -> dict:
    """Relative errors (norm of the difference over the reference's norm) of the fused path."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    mod = FocalModulation(dim, levels, window, normalize_modulator=normalize)
    with torch.no_grad():
        for layer in mod.focal_layers:
            layer[0].weight.mul_(3)  # larger weights, so that GELU's curvature matters
    mod = mod.to(dtype)
    weights = [layer[0].weight for layer in mod.focal_layers]
    ctx, gates = modulate_inputs(mod, dtype, *shape)
    grad_out = torch.randn(ctx.shape).to(dtype)
    ref = mod.aggregate(ctx, gates)
    ref_grads = torch.autograd.grad(ref, [ctx, gates, *weights], grad_out)
    out = fused.fused_aggregate(ctx, gates, weights, normalize)
    grads = torch.autograd.grad(out, [ctx, gates, *weights], grad_out)
    errors = {'dtype': str(out.dtype), 'shape': list(out.shape) == list(ref.shape)}
    for name, a, b in zip(TENSORS, (out, *grads), (ref, *ref_grads)):
        errors[name] = ((a.float() - b.float()).norm() / b.float().norm()).item()
    return errors


def compare_model() -> dict:
    """A whole small FocalNet with the fused path wired in (as on CUDA) against the plain path."""
    import models.focalnet as focalnet
    torch.manual_seed(0)
    model = create_model('focalnet_tiny_lrf', embed_dim=8, depths=(1, 1, 1, 1), num_classes=5,
                         drop_path_rate=0.)
    x = torch.randn(2, 3, 36, 36)
    calls = []
    kernel_path = focalnet.fused_aggregate
    focalnet.fused_aggregate = lambda *a: calls.append(1) or kernel_path(*a)
    results = []
    for fused_on in (False, True):
        focalnet.fused_available = lambda t: fused_on  # what CUDA tensors would get
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    errors = {'output': ((out - ref).norm() / ref.norm()).item()}
    errors['grads'] = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items())
    errors['fused_calls'] = len(calls)
    return errors


@pytest.fixture(scope='module')
def interpreted_results() -> dict:
    code = ('import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_fused as t; '
            'r = {c[0]: t.compare_case(*c[1:]) for c in t.CASES}; r["model"] = t.compare_model(); '
            'print(json.dumps(r))')
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', code, str(ROOT), str(ROOT / 'tests')], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not fused.triton_importable(), reason='the fused path needs triton')
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_fused_matches_plain_forward_and_backward(interpreted_results, case):
    name, _, levels, _, _, dtype, _ = case
    errors = interpreted_results[name]
    assert errors['shape'] and errors['dtype'] == f'torch.{dtype}'
    # float32: the same arithmetic up to summation order. bfloat16: the plain path rounds after
    # every operation, the fused one once per stored tensor.
    tol = 1e-5 if dtype == 'float32' else 3e-2
    for tensor in TENSORS[:3 + levels]:
        assert errors[tensor] < tol, (tensor, errors[tensor])


@pytest.mark.skipif(not fused.triton_importable(), reason='the fused path needs triton')
def test_fused_path_in_the_model_matches_plain(interpreted_results):
    errors = interpreted_results['model']
    assert errors['fused_calls'] == 4  # one block per stage
    assert errors['output'] < 1e-5 and errors['grads'] < 1e-4, errors


def test_gate_count_is_checked():
    mod = FocalModulation(8, 2, 3)
    ctx, gates = modulate_inputs(mod, torch.float32)
    with pytest.raises(ValueError, match='3 gates for 1 focal levels'):
        fused.fused_aggregate(ctx, gates, [mod.focal_layers[0][0].weight])


def test_cpu_tensors_and_the_switch_select_the_plain_path(monkeypatch):
    monkeypatch.setenv('FOCALNET_FUSED', '1')
    assert not fused.fused_available(torch.zeros(1, 4, 2, 2))
    monkeypatch.setenv('FOCALNET_FUSED', '0')
    assert not fused.fused_available(torch.zeros(1, 4, 2, 2))


class _CudaTensor:
    """What fused_available reads of a CUDA tensor (no GPU is needed to check the switch)."""
    is_cuda = True

    def __init__(self, numel: int):
        self._numel = numel

    def numel(self) -> int:
        return self._numel


@pytest.mark.parametrize('setting, expected', [(None, False), ('0', False), ('1', True), ('yes', False)])
def test_the_switch_decides_for_cuda_tensors(monkeypatch, setting, expected):
    """The opt-in: CUDA tensors take the fused path with FOCALNET_FUSED=1 only (and Triton present)."""
    monkeypatch.setattr(fused, 'triton_importable', lambda: True)
    if setting is None:
        monkeypatch.delenv('FOCALNET_FUSED', raising=False)
    else:
        monkeypatch.setenv('FOCALNET_FUSED', setting)
    assert fused.fused_available(_CudaTensor(1000)) is expected
    if expected:
        assert not fused.fused_available(_CudaTensor(2 ** 31))  # beyond 32-bit offsets
        monkeypatch.setattr(fused, 'triton_importable', lambda: False)
        assert not fused.fused_available(_CudaTensor(1000))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='an extra check on a real CUDA tensor')
def test_the_switch_decides_for_a_real_cuda_tensor(monkeypatch):
    x = torch.zeros(1, 4, 2, 2, device='cuda')
    monkeypatch.setenv('FOCALNET_FUSED', '0')
    assert not fused.fused_available(x)
    monkeypatch.setenv('FOCALNET_FUSED', '1')
    assert fused.fused_available(x) is fused.triton_importable()


def test_model_compiles_in_one_graph_and_matches_eager():
    """torch.compile captures forward and backward without graph breaks (aot_eager keeps it quick;
    inductor compiles the same graphs)."""
    torch.manual_seed(0)
    model = create_model('focalnet_tiny_srf', embed_dim=8, depths=(1, 1, 1, 1), num_classes=5,
                         drop_path_rate=0.)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_kernels_compile_for_an_h100():
    """Ahead-of-time compilation to sm_90 machine code (bf16 inputs) catches what the interpreter
    does not check: typing and lowering. No GPU is needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from models.kernels import aggregate

    fp32_pointers = {'w_ptr', 'acc_ptr', 'sum_ptr', 'glob_ptr', 'dout_ptr', 'upvec_ptr', 'dg_ptr'}
    variants = [
        (aggregate.level_fwd, dict(K=3, HAS_ACC=False, STORE_Y=True, DO_SUM=False)),
        (aggregate.level_fwd, dict(K=5, HAS_ACC=True, STORE_Y=False, DO_SUM=True)),
        (aggregate.global_fwd, {}),
        (aggregate.level_bwd, dict(K=7, HAS_UP=True, HAS_UPVEC=True)),
    ]
    for kernel, constexprs in variants:
        constexprs = dict(constexprs, BLOCK_W=fused._BLOCK_W, BLOCK_C=fused._BLOCK_C)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = 'constexpr'
            elif name.endswith('_ptr'):
                signature[name] = '*fp32' if name in fp32_pointers else '*bf16'
            else:
                signature[name] = 'fp32' if name == 'scale' else 'i32'
        src = ASTSource(kernel, signature,
                        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})
        assert len(compiled.asm['cubin']) > 1000, kernel.fn.__name__
