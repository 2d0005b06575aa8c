"""demo/app.py: its functions called directly, the running page queried with gradio's client, and
the page in a real headless Chromium.

The server is started once for the module, as a user starts it (python demo/app.py ...), with an
audit hook that records every connection it opens: none may leave this machine. The browser test
saves a screenshot; with FOCALNET_UPDATE_SCREENSHOT=1 it also replaces docs/figures/demo.png, the one
README.md and docs/tools.md show.
"""
import ast
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo, create_transform

from config import load_config
from demo.app import IMAGE_NAME, Demo, architectures, block_label, main
from errors import UserError
from models.pretrained import to_hf
from test_models import case_model, rel_err
from tools.visualize import (DPI, KERNEL_INCHES, PANEL_INCHES, ModulationArrays, display_image,
                             figure_image, figure_size, load_model, plot_gating, plot_modulator,
                             upsample)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get('FOCALNET_CHROMIUM', '/usr/bin/chromium')
SCREENSHOT = ROOT / 'docs' / 'figures' / 'demo.png'
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- inputs -----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """Random crops of scikit-learn's two sample photos, re-encoded as JPEG files of ImageNet-like
    sizes (a few hundred pixels a side, landscape and portrait)."""
    folder = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(13)
    paths = []
    for i, (image, (h, w)) in enumerate(zip(load_sample_images().images, [(333, 500), (400, 300)])):
        top = rng.integers(0, image.shape[0] - h + 1)
        left = rng.integers(0, image.shape[1] - w + 1)
        paths.append(folder / f'photo{i}.jpg')
        Image.fromarray(image[top:top + h, left:left + w]).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope='module')
def case(reference, tmp_path_factory):
    """The srf reference case (made with the official implementation) as files a user would have:
    a config without its number of classes (the checkpoint tells), and the checkpoint in the
    official and the Hugging Face layout, without its classifier, and the lrf case's, which does
    not fit."""
    data = torch.load(reference / 'cases' / 'srf.pt', weights_only=True)
    lrf = torch.load(reference / 'cases' / 'lrf.pt', weights_only=True)
    folder = tmp_path_factory.mktemp('case')
    c = data['config']
    cfg = folder / 'srf_case.yaml'
    cfg.write_text(f"BASE: ['{ROOT / 'configs' / 'focalnet_tiny_srf.yaml'}']\n"
                   f"DATA:\n  IMG_SIZE: {c['IMG_SIZE']}\n"
                   f"MODEL:\n  FOCAL:\n    EMBED_DIM: {c['EMBED_DIM']}\n"
                   f"    DEPTHS: {list(c['DEPTHS'])}\n")
    files = {'cfg': cfg, 'official': folder / 'srf.pth', 'hf': folder / 'srf_hf.bin',
             'backbone': folder / 'srf_backbone.pth', 'lrf': folder / 'lrf.pth'}
    torch.save({'model': data['state_dict']}, files['official'])
    torch.save(to_hf(data['state_dict']), files['hf'])
    torch.save({k: v for k, v in data['state_dict'].items() if not k.startswith('head.')},
               files['backbone'])
    torch.save({'model': lrf['state_dict']}, files['lrf'])
    return data, files


@pytest.fixture(scope='module')
def demo(case):
    _, files = case
    return Demo(architectures([str(files['cfg'])]))


def expected_top5(model, photo, img_size):
    """The top-5 (index, probability) of ``model`` for a photo file, with timm's evaluation
    transform (resize to size / 0.875, centre crop, bicubic): a pipeline independent of the page's."""
    transform = create_transform(img_size, crop_pct=0.875, interpolation='bicubic')
    with Image.open(photo) as image:
        x = transform(image.convert('RGB'))[None]
    with torch.inference_mode():
        p = model.eval()(x)[0].softmax(-1)
    values, indices = p.topk(5)
    return list(zip(indices.tolist(), values.tolist()))


def pixels(image):
    return np.asarray(image.convert('RGB'), dtype=np.float32)


def assert_figure(image, rows, cols, panel):
    """A figure of ``rows`` x ``cols`` panels (as figure_size lays them out) with something drawn."""
    width, height = figure_size(rows, cols, panel)
    assert abs(image.width - width * DPI) <= 1 and abs(image.height - height * DPI) <= 1
    assert pixels(image).std() > 20


# ---- the functions behind the page --------------------------------------------------------------
def test_blocks_follow_each_release(demo, reference):
    summary = json.loads((reference / 'official_state_dict_keys' / 'summary.json').read_text())
    assert set(summary) <= set(demo.architectures) and len(summary) == 15
    for name, release in summary.items():
        depths = release['constructor_arguments_of_the_release']['depths']
        every, last, gate, size = demo.blocks(name)
        assert every == [block_label((s, b)) for s, d in enumerate(depths) for b in range(d)]
        assert last == [block_label((s, d - 1)) for s, d in enumerate(depths)]
        assert gate == last[-1]
        assert size == load_config(str(ROOT / 'configs' / f'{name}.yaml')).DATA.IMG_SIZE


def reference_arrays(data, block):
    """What the figures draw, from the official implementation's gates and modulator."""
    gates, modulator = data['last_block_gates'][:1], data['last_block_modulator'][:1]
    magnitude = modulator.norm(dim=1)
    return ModulationArrays(data['logits'][:1], {block: gates},
                            {block: upsample(gates, (64, 64), 32)}, {block: magnitude},
                            {block: upsample(magnitude[:, None], (64, 64), 32)[:, 0]})


def test_page_shows_the_reference_numbers(demo, case):
    data, files = case
    loaded = demo.load('srf_case', str(files['official']))
    assert loaded.model.num_classes == 10 and loaded.layout == 'official'
    display = display_image(data['input'][0], MEAN, STD)
    result = demo.explain(loaded, data['input'][:1], display, ['stage 3 block 0'], 'stage -1 block -1')
    # The classes and probabilities are the official model's.
    p = data['logits'][0].softmax(-1)
    order = p.argsort(descending=True)[:5].tolist()
    assert list(result.top) == [f'class {i}' for i in order]
    assert np.allclose(list(result.top.values()), p[order].numpy(), rtol=1e-5, atol=1e-7)
    # The gates and the modulator drawn are the official model's, drawn by the visualiser.
    assert rel_err(result.arrays.gates[(3, 0)], data['last_block_gates'][:1]) < 1e-5
    arrays = reference_arrays(data, (3, 0))
    want = figure_image(plot_gating([display], arrays, (3, 0), [IMAGE_NAME])[0])
    assert np.abs(pixels(result.gating) - pixels(want)).mean() < 0.05
    want = figure_image(plot_modulator([display], arrays, [(3, 0)], [IMAGE_NAME])[0])
    assert np.abs(pixels(result.modulator) - pixels(want)).mean() < 0.05
    assert_figure(result.kernels, 8, 9, KERNEL_INCHES)  # 4 stages x 2 levels; |w| + 8 channels
    assert not result.random_weights and 'official layout' in result.status


def test_a_photo_gets_imagenet_names(demo, photos):
    # The smallest release, random weights: the page names the ImageNet classes as timm does.
    result = demo.analyse('focalnet_tiny_iso', '', Image.open(photos[1]),
                          ['stage 0 block 0', 'stage 0 block 11'], 'stage 0 block 5')
    model = demo.load('focalnet_tiny_iso').model
    info = ImageNetInfo('imagenet-1k')
    want = expected_top5(model, photos[1], 224)
    assert list(result.top) == [info.index_to_description(i) for i, _ in want]
    assert np.allclose(list(result.top.values()), [v for _, v in want], rtol=1e-4)
    assert_figure(result.modulator, 1, 3, PANEL_INCHES)   # image, two blocks
    assert_figure(result.gating, 1, 5, PANEL_INCHES)      # image, 3 levels, global
    assert_figure(result.kernels, 3, 9, KERNEL_INCHES)    # one stage x 3 levels
    assert result.random_weights and 'random weights' in result.status


def test_layouts_and_classifier(demo, case, photos):
    _, files = case
    image = Image.open(photos[0])
    official = demo.analyse('srf_case', str(files['official']), image, ['stage 1 block 0'])
    # The resolution asked for is the one the model sees.
    big = demo.analyse('srf_case', str(files['official']), image, [], None, resolution=96)
    assert '96x96 px' in big.status
    assert_figure(big.gating, 1, 4, PANEL_INCHES)
    hf = demo.analyse('srf_case', str(files['hf']), image, ['stage 1 block 0'])
    assert 'hf layout' in hf.status
    assert list(hf.top) == list(official.top)
    assert np.allclose(list(hf.top.values()), list(official.top.values()), rtol=1e-5)
    # A backbone without a classifier: no classes, the maps all the same.
    backbone = demo.analyse('srf_case', str(files['backbone']), image, ['stage 1 block 0'])
    assert backbone.top == {} and 'no classifier' in backbone.status
    assert backbone.arrays.logits is None
    for block, gates in official.arrays.gates.items():
        assert torch.equal(backbone.arrays.gates[block], gates)
    assert_figure(backbone.gating, 1, 4, PANEL_INCHES)


@pytest.mark.parametrize('change, message', [
    (dict(architecture='focalnet_nano'), "unknown architecture 'focalnet_nano'"),
    (dict(checkpoint='missing.pth'), 'checkpoint not found: missing.pth'),
    (dict(checkpoint='lrf'), 'its weights do not fit srf_case'),
    (dict(image=None), 'no image'),
    (dict(blocks=['stage 7 block 0']), 'stage 7 does not exist'),
    (dict(blocks=['stage 2 block 2']), 'block 2 does not exist'),
    (dict(gate='block 3'), "bad block 'block 3'"),
    (dict(resolution=4), 'resolution 4 px'),
])
def test_mistakes_are_named(demo, case, photos, change, message):
    _, files = case
    args = dict(architecture='srf_case', checkpoint=str(files['official']),
                image=Image.open(photos[0]), blocks=['stage 3 block 0'], gate=None, resolution=None)
    args.update(change)
    if args['checkpoint'] == 'lrf':
        args['checkpoint'] = str(files['lrf'])
    with pytest.raises(UserError, match=message):
        demo.analyse(args['architecture'], args['checkpoint'], args['image'], args['blocks'],
                     args['gate'], args['resolution'])


@pytest.mark.parametrize('argv, message', [
    (['--model', 'focalnet_nano'], "unknown architecture 'focalnet_nano'"),
    (['--checkpoint', 'missing.pth'], 'checkpoint not found: missing.pth'),
    (['--cfg', 'missing.yaml'], 'config file not found: missing.yaml'),
    (['--port', '70000'], '--port 70000'),
])
def test_command_line_mistakes(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


# ---- the running page, through gradio's client ---------------------------------------------------
# Started through this hook, the server writes down every address it looks up or connects to.
NET_HOOK = r'''
import os, runpy, sys
log = open(os.environ['FOCALNET_NET_LOG'], 'a', buffering=1)
def hook(event, args):
    if event == 'socket.connect':
        log.write(repr(('connect', args[1])) + '\n')
    elif event == 'socket.getaddrinfo':
        log.write(repr(('getaddrinfo', args[0])) + '\n')
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def dense_files(tmp_path_factory):
    """A detector and a segmentor checkpoint as python -m detection / segmentation write them (the
    model, its config, the categories), of the configs/demo models with random weights."""
    from detection.model import build_detector
    from segmentation.model import build_segmentor
    folder = tmp_path_factory.mktemp('dense')
    config = load_config(str(ROOT / 'configs' / 'demo' / 'mask_rcnn_shapes.yaml'), ['MODEL.NUM_CLASSES', '3'])
    torch.manual_seed(3)
    torch.save({'model': build_detector(config, 3).state_dict(), 'config': config.dump(), 'epoch': 7,
                'categories': [1, 2, 3], 'category_names': ['disk', 'square', 'triangle']}, folder / 'det.pth')
    config = load_config(str(ROOT / 'configs' / 'demo' / 'upernet_shapes.yaml'))
    torch.save({'model': build_segmentor(config).state_dict(), 'config': config.dump(), 'epoch': 60},
               folder / 'seg.pth')
    return {'detection': folder / 'det.pth', 'segmentation': folder / 'seg.pth'}


@pytest.fixture(scope='module')
def server(case, dense_files, tmp_path_factory):
    """python demo/app.py on a free port of 127.0.0.1, started once: the releases and the srf case
    (--cfg); tiny_srf with random weights on the page; the random detector on the dense tab."""
    _, files = case
    folder = tmp_path_factory.mktemp('server')
    port = free_port()
    env = dict(os.environ, FOCALNET_NET_LOG=str(folder / 'net.log'),
               GRADIO_TEMP_DIR=str(folder / 'gradio'))
    log = open(folder / 'server.log', 'w')
    proc = subprocess.Popen([sys.executable, '-c', NET_HOOK, str(ROOT / 'demo' / 'app.py'),
                             '--cfg', str(files['cfg']), '--model', 'focalnet_tiny_srf',
                             '--port', str(port), '--dense-checkpoint', str(dense_files['detection'])],
                            cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    # A busy shared machine can take minutes to import gradio and build the first model.
    start_limit = float(os.environ.get('FOCALNET_DEMO_START_S', '180'))
    deadline = time.monotonic() + start_limit
    while True:
        if proc.poll() is not None:
            pytest.fail(f'demo/app.py exited with {proc.returncode}:\n'
                        f'{(folder / "server.log").read_text()}')
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f'demo/app.py did not answer in {start_limit:.0f} s (FOCALNET_DEMO_START_S):\n'
                        f'{(folder / "server.log").read_text()}')
        time.sleep(0.5)
    yield url, folder
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope='module')
def client(server, tmp_path_factory):
    from gradio_client import Client
    url, _ = server
    return Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp('downloads')))


def test_client_gets_the_models_answer(client, case, photos):
    from gradio_client import handle_file
    data, files = case
    label, modulator, gating, kernels, status = client.predict(
        'srf_case', str(files['official']), handle_file(str(photos[0])),
        ['stage 0 block 0', 'stage 2 block 1', 'stage 3 block 0'], 'stage 2 block 1', 64,
        api_name='/analyse')
    # The page's top-5 are the reference model's probabilities for the photo, computed here.
    model = case_model(data['config'])
    model.load_state_dict(data['state_dict'])
    want = expected_top5(model, photos[0], 64)
    got = [(c['label'], c['confidence']) for c in label['confidences']]
    assert [name for name, _ in got] == [f'class {i}' for i, _ in want]
    assert rel_err(torch.tensor([p for _, p in got]), torch.tensor([p for _, p in want])) < 1e-5
    assert label['label'] == got[0][0]
    assert_figure(Image.open(modulator), 1, 4, PANEL_INCHES)   # image, three blocks
    assert_figure(Image.open(gating), 1, 4, PANEL_INCHES)      # image, 2 levels, global
    assert_figure(Image.open(kernels), 8, 9, KERNEL_INCHES)
    assert 'srf_case' in status and 'official layout' in status and '64x64 px' in status


def test_client_gets_the_mistake(client, case, photos):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    _, files = case
    with pytest.raises(AppError, match='its weights do not fit srf_case') as error:
        client.predict('srf_case', str(files['lrf']), handle_file(str(photos[0])),
                       ['stage 3 block 0'], 'stage 3 block 0', 64, api_name='/analyse')
    # Named by the architecture's own parameters (the file's own entries are only counted: the page
    # never shows what a file holds): the lrf case's modulation projects to one more level.
    assert 'of another shape: layers.0.blocks.0.modulation.f.weight' in str(error.value)


# ---- the page in Chromium ------------------------------------------------------------------------
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync']


def test_page_in_a_browser(server, photos, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f'Chromium not found at {CHROMIUM}: apt-get install chromium, or set '
                    'FOCALNET_CHROMIUM')
    url, _ = server
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / 'profile'), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={'width': 1400, 'height': 1000})
        try:
            browser.on('request', lambda request: requests.append(request.url))
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(url, wait_until='networkidle')
            assert page.title() == 'FocalNet: what focal modulation sees'
            assert page.locator('.gallery-item').count() == 2  # the two sample photos
            page.locator('#image input[type=file]').set_input_files(str(photos[1]))
            page.locator('#image img').wait_for()

            start = time.perf_counter()
            page.locator('#run').click()
            entries = page.locator('#top5 [data-testid$="-confidence-set"]')
            entries.nth(4).wait_for()
            for name in ('modulator', 'gating', 'kernels'):
                page.wait_for_function(
                    f'() => {{ const i = document.querySelector("#{name} img");'
                    ' return i !== null && i.complete && i.naturalWidth > 0; }')
            seconds = time.perf_counter() - start
            print(f'\nfocalnet_tiny_srf: the page answered in {seconds:.2f} s (the first answer '
                  'after start: it draws the kernels too)')

            # The classes are those of tiny_srf with the page's random weights, named as timm names them.
            names = [entries.nth(i).locator('dt').inner_text() for i in range(5)]
            config = load_config(str(ROOT / 'configs' / 'focalnet_tiny_srf.yaml'))
            model, _ = load_model(config)
            info = ImageNetInfo('imagenet-1k')
            assert names == [info.index_to_description(i)
                             for i, _ in expected_top5(model, photos[1], 224)]
            sizes = {name: page.evaluate(f'() => document.querySelector("#{name} img").naturalWidth')
                     for name in ('modulator', 'gating', 'kernels')}
            # image + last block of 4 stages; image + 2 levels + global; |w| + 8 channels
            assert sizes == {'modulator': round(figure_size(1, 5, PANEL_INCHES)[0] * DPI),
                             'gating': round(figure_size(1, 4, PANEL_INCHES)[0] * DPI),
                             'kernels': round(figure_size(8, 9, KERNEL_INCHES)[0] * DPI)}
            status = page.locator('#status').inner_text()
            assert 'focalnet_tiny_srf' in status and 'random weights' in status
            toast = page.locator('[data-testid=toast-body]')
            assert 'random weights' in toast.inner_text()
            toast.locator('[data-testid=toast-close]').click()
            toast.wait_for(state='detached')

            # Another photo: the model and its kernels are ready, so this is the usual answer.
            before = page.evaluate('() => document.querySelector("#modulator img").src')
            page.locator('#image [aria-label="Remove Image"]').click()
            page.locator('#image input[type=file]').set_input_files(str(photos[0]))
            page.locator('#image img').wait_for()
            start = time.perf_counter()
            page.locator('#run').click()
            page.wait_for_function(
                '(before) => { const i = document.querySelector("#modulator img");'
                ' return i.src !== before && i.complete && i.naturalWidth > 0; }', arg=before)
            print(f'focalnet_tiny_srf: the next photo took {time.perf_counter() - start:.2f} s')
            page.locator('[data-testid=toast-close]').click()  # the warning, again
            page.locator('[data-testid=toast-body]').wait_for(state='detached')
            page.screenshot(path=str(tmp_path / 'demo.png'), full_page=True)
        finally:
            browser.close()

    # Everything the page loaded came from the server on this machine.
    assert requests
    outside = [u for u in requests
               if urlparse(u).scheme not in ('data', 'blob') and urlparse(u).hostname != '127.0.0.1']
    assert outside == []
    shot = Image.open(tmp_path / 'demo.png')
    assert shot.width == 1400 and shot.height > 1000 and pixels(shot).std() > 20
    if os.environ.get('FOCALNET_UPDATE_SCREENSHOT') == '1':
        # A 256-colour palette keeps the README's figure small.
        shot.convert('RGB').quantize(256, method=Image.Quantize.FASTOCTREE).save(SCREENSHOT,
                                                                          optimize=True)


def test_server_reached_nothing_outside(server):
    # Runs after the client and browser tests: start-up, their requests, nothing else.
    _, folder = server
    entries = [ast.literal_eval(line) for line in (folder / 'net.log').read_text().splitlines()]
    loopback = {'127.0.0.1', 'localhost', '::1'}
    for kind, target in entries:
        host = target if kind == 'getaddrinfo' else (target[0] if isinstance(target, tuple) else None)
        assert host is None or host in loopback or str(host).startswith('127.'), (kind, target)
    assert ('connect', ('127.0.0.1', int(urlparse(server[0]).port))) in entries  # the hook works


# ---- the detection and segmentation tab -----------------------------------------------------------
def expected_dense_rows(task, checkpoint, photo, score_thresh):
    """The table the tab must show, computed here from the checkpoint's tensors with the models'
    own forward (torchvision's detector; the segmentor at the config's test scale)."""
    from detection.model import build_detector
    from segmentation.inference import predict
    from segmentation.model import build_segmentor
    state = torch.load(checkpoint, weights_only=True)
    with Image.open(photo) as image:
        pixels = torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)
    if task == 'detection':
        model = build_detector(load_config(str(ROOT / 'configs' / 'demo' / 'mask_rcnn_shapes.yaml')), 3)
        model.load_state_dict(state['model'])
        with torch.inference_mode():
            out = model.eval()([pixels.float() / 255])[0]
        keep = out['scores'] >= score_thresh
        return [[state['category_names'][int(c) - 1], float(s)]
                for c, s in zip(out['labels'][keep], out['scores'][keep])]
    config = load_config(str(ROOT / 'configs' / 'demo' / 'upernet_shapes.yaml'))
    model = build_segmentor(config)
    model.load_state_dict(state['model'])
    pred = predict(model.eval(), pixels[None], scale=list(config.SEG.TEST.SCALE))[0]
    counts = torch.bincount(pred.flatten(), minlength=4)
    return sorted([[list(config.SEG.CLASS_NAMES)[c], 100 * int(counts[c]) / pred.numel()]
                   for c in range(4) if counts[c]], key=lambda r: -r[1])


def assert_rows(got, want):
    assert [r[0] for r in got] == [r[0] for r in want] and len(want) > 0
    assert np.allclose([float(r[1]) for r in got], [r[1] for r in want], atol=1e-2)


@pytest.mark.parametrize('task', ['detection', 'segmentation'])
def test_dense_tab_computes_the_models_answer(dense_files, photos, task):
    from demo.dense import DenseDemo
    result = DenseDemo().run(task, str(dense_files[task]), '', Image.open(photos[0]), 0.0)
    assert_rows(result.rows, expected_dense_rows(task, dense_files[task], photos[0], 0.0))
    assert result.drawn.size == Image.open(photos[0]).size
    assert np.abs(pixels(result.drawn) - pixels(Image.open(photos[0]))).mean() > 2  # something drawn
    assert 'upernet_shapes' in result.status if task == 'segmentation' else 'mask_rcnn_shapes' in result.status


@pytest.mark.parametrize('change, message', [
    (dict(checkpoint=''), 'no checkpoint'),
    (dict(checkpoint='missing.pth'), 'checkpoint not found: missing.pth'),
    (dict(image=None), 'no image'),
    (dict(thresh=2.0), 'score threshold 2.0'),
    (dict(task='classification'), "unknown task 'classification'"),
])
def test_dense_tab_mistakes_are_named(dense_files, photos, change, message):
    from demo.dense import DenseDemo
    args = dict(task='detection', checkpoint=str(dense_files['detection']), image=Image.open(photos[0]), thresh=0.3)
    args.update(change)
    with pytest.raises(UserError, match=message):
        DenseDemo().run(args['task'], args['checkpoint'], '', args['image'], args['thresh'])


def test_client_gets_the_dense_answer(client, dense_files, photos):
    from gradio_client import handle_file
    for task in ('detection', 'segmentation'):
        drawn, table, status = client.predict(task, str(dense_files[task]), '', handle_file(str(photos[1])), 0.0,
                                              api_name='/dense')
        assert_rows(table['data'], expected_dense_rows(task, dense_files[task], photos[1], 0.0))
        assert Image.open(drawn).size == Image.open(photos[1]).size
        assert task in status


def test_dense_tab_in_a_browser(server, dense_files, photos, tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f'Chromium not found at {CHROMIUM}: apt-get install chromium, or set FOCALNET_CHROMIUM')
    url, _ = server
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / 'profile'), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={'width': 1400, 'height': 1000})
        try:
            browser.on('request', lambda request: requests.append(request.url))
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(url, wait_until='networkidle')
            page.get_by_role('tab', name='Detection and segmentation').click()
            # The checkpoint given with --dense-checkpoint is in its box.
            assert page.locator('#dense-checkpoint textarea').input_value() == str(dense_files['detection'])
            page.locator('#dense-image input[type=file]').set_input_files(str(photos[0]))
            page.locator('#dense-image img').wait_for()
            page.locator('#dense-threshold input[type=number]').fill('0.3')
            page.locator('#dense-threshold input[type=number]').press('Enter')
            for task in ('detection', 'segmentation'):
                if task == 'segmentation':
                    page.locator('#dense-task').get_by_label('segmentation').check()
                    page.locator('#dense-checkpoint textarea').fill(str(dense_files['segmentation']))
                before = page.evaluate('() => { const i = document.querySelector("#dense-drawn img");'
                                       ' return i === null ? "" : i.src; }')
                page.locator('#dense-run').click()
                # The answer (the status names the task) or an error (a toast, whose text is shown).
                page.wait_for_function(
                    f'() => document.querySelector("#dense-status").innerText.includes("({task})")'
                    ' || document.querySelector("[data-testid=toast-body]") !== null', timeout=300_000)
                toast = page.locator('[data-testid=toast-body]')
                assert toast.count() == 0, toast.first.inner_text()
                page.wait_for_function(
                    '(before) => { const i = document.querySelector("#dense-drawn img");'
                    ' return i !== null && i.src !== before && i.complete && i.naturalWidth > 0; }', arg=before)
                page.wait_for_function('() => document.querySelector(\'#dense-table [data-testid="cell-0-1"]\') !== null')
                # gradio's table: one element per cell, data-testid cell-<row>-<column>; it may draw only
                # the rows in view, so the rows drawn are compared, in order, from the first.
                cells = page.evaluate('() => Array.from(document.querySelectorAll(\'#dense-table [data-testid^="cell-"]\'))'
                                      '.map(c => [c.getAttribute("data-testid"), c.innerText.trim()])')
                table = {}
                for testid, text in cells:
                    row, column = map(int, testid.split('-')[1:3])
                    table.setdefault(row, {})[column] = text
                rows = [[table[r][0], table[r][1]] for r in sorted(table)]
                want = expected_dense_rows(task, dense_files[task], photos[0], 0.3)
                assert len(rows) >= min(len(want), 5)
                assert_rows(rows, want[:len(rows)])
                width = page.evaluate('() => document.querySelector("#dense-drawn img").naturalWidth')
                assert width == Image.open(photos[0]).width
            page.screenshot(path=str(tmp_path / 'dense.png'), full_page=True)
        finally:
            browser.close()
    outside = [u for u in requests
               if urlparse(u).scheme not in ('data', 'blob') and urlparse(u).hostname != '127.0.0.1']
    assert requests and outside == []
