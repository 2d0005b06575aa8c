"""torch.compile(fullgraph=True), torch.export and ONNX (tools/export.py, run in ONNX Runtime) agree
with eager PyTorch to 1e-5, with a fixed and with a free batch size.

TorchScript and torch.fx (with torchvision's create_feature_extractor) are checked for all fifteen
models in tests/test_timm_interface.py, compiled inference here. For the exports three releases cover
every option of the architecture:
focalnet_tiny_srf (patch stem), focalnet_base_iso (isotropic, layer scale, post-norm, the
modulation's norm) and focalnet_large_fl4 (overlapping convolutional stem and downsamplers, layer
scale, post-norm, normalised modulator), shrunk in width and depth. Inputs are 100x76, a size
that is not a multiple of 32, so the exported graphs keep the flooring patch convolutions.
"""
import pytest
import torch

from models import create_model, list_models
from tools import export as export_tool

MODELS = ['focalnet_tiny_srf', 'focalnet_base_iso', 'focalnet_large_fl4']
SIZE = (100, 76)


def small(name: str, **kw):
    depths = (2,) if name.endswith('_iso') else (1, 1, 2, 1)
    torch.manual_seed(0)
    model = create_model(name, **{'embed_dim': 16, 'depths': depths, 'num_classes': 10, **kw})
    # Random weights everywhere, layer scales and norms included, so that no branch is a no-op.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def rel_err(got, want):
    return export_tool.relative_error(got, want)


@pytest.fixture
def fresh_dynamo():
    # Each test compiles other modules; dynamo's per-function recompilation limit counts them all.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('name', list_models())
def test_compile_fullgraph_inference(name, fresh_dynamo):
    model = small(name)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_compile_fullgraph_training_step(fresh_dynamo):
    """Gradients through the compiled graph (the way compile is used for training) equal eager ones."""
    model = small('focalnet_large_fl4', drop_path_rate=0.).train()
    x, target = torch.randn(2, 3, *SIZE), torch.tensor([1, 7])
    grads = []
    for net in (model, torch.compile(model, fullgraph=True, backend='aot_eager')):
        model.zero_grad()
        torch.nn.functional.cross_entropy(net(x), target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) < 1e-5, n


@pytest.mark.parametrize('name', MODELS)
def test_torch_export_fixed_and_free_batch(name, tmp_path):
    model = small(name)
    for dynamic in (False, True):
        path = export_tool.export(model, 'export', torch.randn(2, 3, *SIZE), tmp_path / 'm.pt2', dynamic)
        inputs = export_tool.check_inputs(2, SIZE, dynamic)
        checks = export_tool.check(model, 'export', path, inputs)
        assert [c['input'][0] for c in checks] == ([2, 1] if dynamic else [2])
        assert max(c['relative_error'] for c in checks) < 1e-5
    with pytest.raises(Exception):  # the fixed-batch program refuses another batch
        program = export_tool.export(model, 'export', torch.randn(2, 3, *SIZE), tmp_path / 's.pt2')
        export_tool.load_runner('export', program)(torch.randn(3, 3, *SIZE))


@pytest.mark.parametrize('name,dynamic', [('focalnet_tiny_srf', False), ('focalnet_tiny_srf', True),
                                          ('focalnet_base_iso', True), ('focalnet_large_fl4', True)])
def test_onnx_runtime_matches_pytorch(name, dynamic, tmp_path):
    pytest.importorskip('onnxruntime', reason='ONNX checks need requirements-export.txt')
    import onnx
    model = small(name)
    path = export_tool.export(model, 'onnx', torch.randn(1, 3, *SIZE), tmp_path / 'm.onnx', dynamic)
    assert not (tmp_path / 'm.onnx.data').exists()  # small weights stay in the one file
    graph = onnx.load(str(path))
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch.dim_param != '') == dynamic and (batch.dim_value == 1) == (not dynamic)
    checks = export_tool.check(model, 'onnx', path, export_tool.check_inputs(1, SIZE, dynamic))
    assert [c['input'][0] for c in checks] == ([1, 2] if dynamic else [1])
    assert max(c['relative_error'] for c in checks) < 1e-5


def _checkpoint(tmp_path):
    """A small focalnet_tiny_srf in the timm layout, with 7 classes."""
    from models.pretrained import to_timm
    model = small('focalnet_tiny_srf', num_classes=7)
    path = tmp_path / 'weights.pth'
    torch.save(to_timm(model.state_dict(), use_postln=False), path)
    return model, path


SMALL_OPTS = ['--opts', 'MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]']


def test_export_command_loads_weights_and_checks(tmp_path, capsys):
    model, weights = _checkpoint(tmp_path)
    out = tmp_path / 'm.pt'
    code = export_tool.main(['--model', 'focalnet_tiny_srf', '--checkpoint', str(weights),
                             '--format', 'torchscript', '--output', str(out), '--img-size', '99', '75',
                             '--batch-size', '2'] + SMALL_OPTS)
    assert code == 0
    scripted = export_tool.load_runner('torchscript', out)
    x = torch.randn(3, 3, 99, 75)
    with torch.no_grad():  # the classes follow the file (7), the weights are the file's
        assert rel_err(scripted(x), model(x)) < 1e-5 and scripted(x).shape == (3, 7)


def test_export_command_mistakes_are_one_line(tmp_path, capsys):
    assert export_tool.main(['--model', 'focalnet_tiny_srf', '--checkpoint', str(tmp_path / 'no.pth'),
                             '--output', str(tmp_path / 'm.onnx')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and 'checkpoint not found' in err and 'no.pth' in err
    assert export_tool.main(['--model', 'focalnet_tiny_sfr', '--output', str(tmp_path / 'm.onnx')]) == 2
    assert 'focalnet_tiny_sfr' in capsys.readouterr().err
    assert export_tool.main(['--model', 'focalnet_tiny_srf', '--output', str(tmp_path / 'm.onnx'),
                             '--img-size', '16'] + SMALL_OPTS) == 2
    assert '--img-size must be an integer from 32 to 4096' in capsys.readouterr().err
    # A patch of 64 pixels makes the total stride 512: larger than a 256 px export.
    assert export_tool.main(['--model', 'focalnet_tiny_srf', '--output', str(tmp_path / 'm.onnx'),
                             '--img-size', '256'] + SMALL_OPTS + ['MODEL.FOCAL.PATCH_SIZE', '64']) == 2
    assert 'smaller than the model' in capsys.readouterr().err
