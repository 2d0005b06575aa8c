"""tools/visualize.py: the maps it draws are the model's, and the figures come out for real photos."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images

from test_models import case_model, rel_err
from tools.visualize import (DPI, KERNEL_INCHES, PANEL_INCHES, class_names, display_image,
                             figure_image, figure_size, kernel_maps, main, modulation_arrays,
                             plot_gating, plot_kernels, plot_modulator, upsample)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope='module')
def photos():
    """scikit-learn's two sample photos (china.jpg, flower.jpg), 427x640 JPEG files."""
    return [Path(p) for p in load_sample_images().filenames]


@pytest.fixture(scope='module')
def srf(reference):
    data = torch.load(reference / 'cases' / 'srf.pt', weights_only=True)
    model = case_model(data['config']).eval()
    model.load_state_dict(data['state_dict'], strict=True)
    return model, data


def photo_batch(paths, size=64):
    """Photos centre-cropped, resized and normalised as the evaluation transform does."""
    tensors = []
    for path in paths:
        image = Image.open(path).convert('RGB')
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        tensors.append((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
    return torch.stack(tensors)


def saved_panels(fig, path):
    """Save ``fig`` and return the pixels of each image panel (colour bars excluded)."""
    fig.savefig(path, dpi=DPI)
    pixels = np.asarray(Image.open(path).convert('RGB'), dtype=np.float32)
    height = pixels.shape[0]
    panels = []
    for ax in fig.axes:
        if not ax.images or ax.get_label() == '<colorbar>':
            continue
        x0, y0, x1, y1 = ax.get_window_extent().extents
        panels.append(pixels[int(height - y1) + 2:int(height - y0) - 2, int(x0) + 2:int(x1) - 2])
    return panels


# ---- the arrays are the model's ---------------------------------------------------------------------
def test_gates_and_modulator_are_the_models(srf):
    model, data = srf
    arrays = modulation_arrays(model, data['input'], [(-1, -1)])
    assert list(arrays.gates) == [(3, 0)]
    assert rel_err(arrays.gates[(3, 0)], data['last_block_gates']) < 1e-5
    assert rel_err(arrays.logits, data['logits']) < 1e-5
    # What gating_maps.png draws: the reference gates upsampled bilinearly to the 64x64 input.
    expected = F.interpolate(data['last_block_gates'], size=(64, 64), mode='bilinear',
                             align_corners=False)
    assert rel_err(arrays.gates_up[(3, 0)], expected) < 1e-5
    magnitude = data['last_block_modulator'].norm(dim=1)
    assert rel_err(arrays.magnitude[(3, 0)], magnitude) < 1e-5
    assert arrays.magnitude_up[(3, 0)].shape == (2, 64, 64)


def test_upsampling_is_bilinear_over_the_cells_area():
    # Two cells of a stride-32 map, 0 on the left and 1 on the right: the edge lies at pixel 32,
    # and stays there when the image (60 wide) is smaller than the padded area the cells cover.
    cells = torch.tensor([[[[0., 1.]]]])
    for width in (64, 60):
        up = upsample(cells, (1, width), stride=32)[0, 0, 0]
        assert up.shape == (width,)
        assert torch.allclose(up[31] + up[32], torch.tensor(1.))
        assert up[31] < 0.5 < up[32]
        assert len(up.unique()) > 2  # not nearest (a chessboard)


def test_kernels_are_the_depthwise_weights(srf):
    model, _ = srf
    kernels = kernel_maps(model)
    assert [(k.stage, k.block, k.level) for k in kernels] == [
        (s, b, l) for s, b in [(0, 0), (1, 0), (2, 1), (3, 0)] for l in range(2)]
    for k in kernels:
        weight = model.layers[k.stage].blocks[k.block].modulation.focal_layers[k.level][0].weight
        assert np.array_equal(k.weight, weight[:, 0].detach().numpy())
        assert np.allclose(k.footprint, weight.abs().mean((0, 1)).detach().numpy())
    # Kernels 3 and 5 stacked: 3 then 7 cells, at strides 4, 8, 16, 32.
    assert [k.reach for k in kernels] == [12, 28, 24, 56, 48, 112, 96, 224]
    assert [k.block for k in kernel_maps(model, block_index=0)][4:6] == [0, 0]


def test_display_image_undoes_the_normalisation(photos):
    x = photo_batch(photos[:1])[0]
    image = display_image(x, MEAN, STD)
    assert image.shape == (64, 64, 3)
    raw = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert np.allclose(image, raw.permute(1, 2, 0).numpy(), atol=1e-6)


# ---- the figures ------------------------------------------------------------------------------------
def test_figures_for_real_photos(srf, photos, tmp_path):
    model, _ = srf
    images = photo_batch(photos)
    display = [display_image(x, MEAN, STD) for x in images]
    names = [p.name for p in photos]
    blocks = [(0, 0), (2, 1), (3, 0)]
    arrays = modulation_arrays(model, images, [(2, 1), *blocks])

    fig, grid = plot_gating(display, arrays, (2, 1), names)
    assert grid == (2, 4)  # image, level 0, level 1, global
    panels = saved_panels(fig, tmp_path / 'gating.png')
    assert len(panels) == 8
    assert all(p.std() > 5 for p in panels)
    # The first panel of each row is the photo the model saw.
    assert np.abs(panels[0].mean((0, 1)) - display[0].mean((0, 1)) * 255).max() < 25

    fig, grid = plot_modulator(display, arrays, blocks, names)
    assert grid == (2, 4)
    panels = saved_panels(fig, tmp_path / 'modulator.png')
    assert len(panels) == 8 and all(p.std() > 5 for p in panels)

    fig, grid = plot_kernels(kernel_maps(model), channels=4)
    assert grid == (8, 5)  # 4 stages x 2 levels; footprint + 4 channels
    panels = saved_panels(fig, tmp_path / 'kernels.png')
    assert len(panels) == 40 and all(p.std() > 5 for p in panels)


def test_figure_image_is_the_png_savefig_writes(srf, photos, tmp_path):
    model, _ = srf
    images = photo_batch(photos[:1])
    arrays = modulation_arrays(model, images, [(-1, -1)])

    def draw():  # a fresh figure each time: constrained layout settles again on a second draw
        return plot_gating([display_image(images[0], MEAN, STD)], arrays, (3, 0), ['china.jpg'])[0]

    draw().savefig(tmp_path / 'gating.png', dpi=DPI)
    assert np.array_equal(np.asarray(figure_image(draw())), png(tmp_path / 'gating.png'))


def test_class_names_are_timms_imagenet_names():
    from timm.data import ImageNetInfo

    names = class_names(1000)
    info = ImageNetInfo('imagenet-1k')
    assert len(names) == 1000 and names[0] == info.index_to_description(0) == 'tench, Tinca tinca'
    # Two classes are called crane (the bird and the machine): their WordNet ids tell them apart.
    assert [names[i] for i in (134, 517)] == ['crane (n02012849)', 'crane (n03126707)']
    assert len(set(names)) == 1000
    names = class_names(21842)  # the 22K releases' order
    assert len(names) == 21842 and len(set(names)) == 21842
    assert names[0] == 'tench, Tinca tinca'
    assert class_names(10) is None


# ---- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def srf_files(srf, tmp_path_factory):
    """The srf reference case as a config file and an official-layout checkpoint."""
    _, data = srf
    folder = tmp_path_factory.mktemp('srf')
    c = data['config']
    (folder / 'tiny.yaml').write_text(
        f"BASE: ['{ROOT / 'configs' / 'focalnet_tiny_srf.yaml'}']\n"
        f"DATA:\n  IMG_SIZE: {c['IMG_SIZE']}\n"
        f"MODEL:\n  NUM_CLASSES: {c['NUM_CLASSES']}\n"
        f"  FOCAL:\n    EMBED_DIM: {c['EMBED_DIM']}\n    DEPTHS: {list(c['DEPTHS'])}\n")
    torch.save({'model': data['state_dict']}, folder / 'srf.pth')
    return folder / 'tiny.yaml', folder / 'srf.pth'


def png(path):
    image = Image.open(path)
    assert image.format == 'PNG'
    return np.asarray(image.convert('RGB'), dtype=np.float32)


def assert_grid(pixels, rows, cols, panel):
    width, height = figure_size(rows, cols, panel)
    assert abs(pixels.shape[1] - width * DPI) <= 1 and abs(pixels.shape[0] - height * DPI) <= 1


def test_command_draws_the_three_figures(srf_files, photos, tmp_path):
    cfg, checkpoint = srf_files
    out = tmp_path / 'vis'
    command = [sys.executable, str(ROOT / 'tools' / 'visualize.py'), '--cfg', str(cfg),
               '--checkpoint', str(checkpoint), '--image', str(photos[0]), '--image', str(photos[1]),
               '--output', str(out)]
    # From another folder, as after a fresh clone: the script finds the repository's packages.
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert 'loaded' in done.stderr and 'randomly initialised' not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ['gating_maps.png', 'kernels.png', 'modulator.png']
    kernels, gating, modulator = (png(out / n) for n in ('kernels.png', 'gating_maps.png',
                                                         'modulator.png'))
    assert_grid(kernels, 8, 9, KERNEL_INCHES)     # 4 stages x 2 levels; |w| + 8 channels
    assert_grid(gating, 2, 4, PANEL_INCHES)       # 2 photos; image, 2 levels, global
    assert_grid(modulator, 2, 5, PANEL_INCHES)    # 2 photos; image, last block of 4 stages
    for pixels in (kernels, gating, modulator):
        assert pixels.std() > 20


def test_build_loads_the_checkpoint_and_the_eval_transform(srf, srf_files, photos):
    from tools.visualize import build, load_images, parse_args

    _, data = srf
    cfg, checkpoint = srf_files
    args = parse_args(['--cfg', str(cfg), '--checkpoint', str(checkpoint), '--image', str(photos[0]),
                       '--output', 'unused'])
    _, model, transform = build(args)
    for key, value in model.state_dict().items():
        assert torch.equal(value, data['state_dict'][key]), key
    images, display = load_images([photos[0]], transform)
    assert images.shape == (1, 3, 64, 64)
    # A 427x640 photo, resized and centre-cropped to the square the model saw, and shown as such.
    assert display[0].shape == (64, 64, 3)
    assert np.allclose(display[0], display_image(images[0], MEAN, STD))


def test_random_weights_warn_and_options_apply(srf_files, photos, tmp_path, caplog):
    cfg, _ = srf_files
    out = tmp_path / 'vis'
    rc = main(['--cfg', str(cfg), '--image', str(photos[1]), '--output', str(out),
               '--gate-block', '0', '0', '--modulator-block', '2', '-1', '--modulator-block', '1', '0',
               '--kernel-block', '0', '--channels', '3', '--cmap', 'magma', '--no-crop'])
    assert rc == 0
    assert any(r.levelname == 'WARNING' and 'random' in r.getMessage() for r in caplog.records)
    assert_grid(png(out / 'kernels.png'), 8, 4, KERNEL_INCHES)
    assert_grid(png(out / 'gating_maps.png'), 1, 4, PANEL_INCHES)
    assert_grid(png(out / 'modulator.png'), 1, 3, PANEL_INCHES)


@pytest.mark.parametrize('change, message', [
    (['--image', 'missing.jpg'], 'missing.jpg'),
    (['--gate-block', '7', '0'], 'stage 7'),
    (['--modulator-block', '1', '5'], 'block 5'),
    (['--cmap', 'no_such_map'], 'no_such_map'),
    (['--opts', 'MODEL.FOCAL.EMBED_DIM', '32'], 'cannot load'),
])
def test_mistakes_are_named(srf_files, photos, tmp_path, capsys, change, message):
    cfg, checkpoint = srf_files
    argv = ['--cfg', str(cfg), '--checkpoint', str(checkpoint), '--output', str(tmp_path)]
    if '--image' not in change:
        argv += ['--image', str(photos[0])]
    assert main(argv + change) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
