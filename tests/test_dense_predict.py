"""``python -m detection.predict`` and ``python -m segmentation.predict`` on real photos (crops of
scikit-learn's sample photos), from checkpoints as the training runs write them and from a released
UPerNet file: what they write is the models' own forward, computed here from the files' tensors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from conftest import ROOT

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

DET_CFG = ROOT / 'configs' / 'demo' / 'mask_rcnn_shapes.yaml'
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255


def pixels_of(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)


@pytest.fixture(scope='module')
def detector_checkpoint(tmp_path_factory):
    """A checkpoint as python -m detection writes it (model, config, category ids and names) of the
    demo Mask R-CNN with random weights; category ids 5, 9, 11 as a data set may number them."""
    from detection.model import build_detector
    config = load_config(str(DET_CFG), ['MODEL.NUM_CLASSES', '3'])
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp('det') / 'ckpt_epoch_7.pth'
    torch.save({'model': build_detector(config, 3).state_dict(), 'config': config.dump(), 'epoch': 7,
                'categories': [5, 9, 11], 'category_names': ['disk', 'square', 'triangle']}, path)
    return path


def test_detection_predict_writes_the_detectors_output(detector_checkpoint, photo_folder, tmp_path, capsys):
    from detection.model import build_detector
    from detection.predict import main
    photos = photo_folder(4) / 'train'
    out = tmp_path / 'out'
    assert main(['--checkpoint', str(detector_checkpoint), str(photos / 'china'), str(photos / 'flower' / '*.jpg'),
                 '--output-dir', str(out), '--score-thresh', '0.2']) == 0
    images = json.loads((out / 'images.json').read_text())
    results = json.loads((out / 'results.json').read_text())
    assert [Path(i['file_name']).parent.name for i in images] == ['china', 'china', 'flower', 'flower']
    model = build_detector(load_config(str(DET_CFG)), 3)
    model.load_state_dict(torch.load(detector_checkpoint, weights_only=True)['model'])
    model.eval()
    for entry in images:
        pixels = pixels_of(entry['file_name'])
        assert (entry['width'], entry['height']) == (pixels.shape[2], pixels.shape[1])
        with torch.inference_mode():
            want = model([pixels.float() / 255])[0]
        got = [r for r in results if r['image_id'] == entry['id']]
        assert len(got) == len(want['scores']) > 0
        assert [r['category_id'] for r in got] == [[5, 9, 11][int(c) - 1] for c in want['labels']]
        assert np.allclose([r['score'] for r in got], want['scores'].numpy(), atol=1e-6)
        x1, y1, x2, y2 = want['boxes'][0].tolist()
        assert np.allclose(got[0]['bbox'], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
        assert 'segmentation' in got[0]
        drawn = Image.open(out / f'{Path(entry["file_name"]).stem}.jpg')
        assert drawn.size == (entry['width'], entry['height'])
    printed = capsys.readouterr().out
    assert f'{len(results)} detections of 4 images' in printed


@pytest.mark.parametrize('change, message', [
    (dict(thresh='1.5'), '--score-thresh must be between 0 and 1'),
    (dict(checkpoint='missing.pth'), 'checkpoint not found: missing.pth'),
    (dict(device='cuda:x'), "bad --device 'cuda:x'"),
    (dict(images='nothing/here.jpg'), 'image file or folder not found: nothing/here.jpg'),
])
def test_detection_predict_mistakes(detector_checkpoint, photo_folder, tmp_path, capsys, change, message):
    from detection.predict import main
    a = dict(images=str(photo_folder(4) / 'train'), checkpoint=str(detector_checkpoint), thresh='0.3', device='cpu')
    a.update(change)
    assert main([a['images'], '--checkpoint', a['checkpoint'], '--output-dir', str(tmp_path / 'o'),
                 '--score-thresh', a['thresh'], '--device', a['device']]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and '\n' not in err and 'Traceback' not in err, err


def test_segmentation_predict_from_a_released_file(reference, photo_folder, tmp_path):
    """A released-layout UPerNet file (the official backbone of the reference, mmseg's head layout)
    with its config: the palette PNG holds the argmax of the model's logits for the photo, computed
    here at the photo's own size (the test scale set to it, so nothing is resized)."""
    from segmentation.checkpoint import load_segmentor_weights
    from segmentation.classes import palette
    from segmentation.model import build_segmentor
    from segmentation.predict import main
    from test_segmentation import fake_release
    case = torch.load(reference / 'dense' / 'upernet_tiny_srf.pt', weights_only=True)
    release = tmp_path / 'upernet_release.pth'
    torch.save(fake_release(case), release)
    photo = sorted((photo_folder(4) / 'train' / 'flower').glob('*.jpg'))[0]
    h, w = pixels_of(photo).shape[1:]
    c = case['config']
    opts = ['MODEL.FOCAL.EMBED_DIM', str(c['embed_dim']), 'MODEL.FOCAL.DEPTHS', str(c['depths']),
            'SEG.HEAD.CHANNELS', '16', 'SEG.HEAD.AUX_CHANNELS', '8', 'SEG.TEST.SCALE', f'[{max(h, w)}, {min(h, w)}]']
    cfg = str(ROOT / 'configs' / 'segmentation' / 'upernet_focalnet_tiny_srf_160k.yaml')
    assert main(['--cfg', cfg, '--checkpoint', str(release), str(photo), '--output-dir', str(tmp_path / 'seg'),
                 '--opts', *opts]) == 0
    png = Image.open(tmp_path / 'seg' / f'{photo.stem}.png')
    model = build_segmentor(load_config(cfg, opts))
    load_segmentor_weights(model, str(release))
    with torch.inference_mode():
        logits = model.eval()(((pixels_of(photo).float() - IMAGENET_MEAN) / IMAGENET_STD)[None])
    want = logits[0].argmax(0).numpy()
    assert png.mode == 'P' and png.size == (w, h)
    assert (np.asarray(png) == want).mean() > 0.999  # ties in float sums aside
    assert png.getpalette()[:450] == palette(150).ravel().tolist()
    overlay = Image.open(tmp_path / 'seg' / f'{photo.stem}_overlay.jpg')
    assert overlay.size == (w, h)


def test_segmentation_predict_needs_a_config_for_a_released_file(reference, tmp_path, capsys):
    from segmentation.predict import main
    from test_segmentation import fake_release
    case = torch.load(reference / 'dense' / 'upernet_tiny_srf.pt', weights_only=True)
    torch.save(fake_release(case), tmp_path / 'release.pth')
    Image.new('RGB', (32, 32)).save(tmp_path / 'a.jpg')
    assert main(['--checkpoint', str(tmp_path / 'release.pth'), str(tmp_path / 'a.jpg'),
                 '--output-dir', str(tmp_path / 'o')]) == 2
    assert 'holds no config (a released file?): give the config' in capsys.readouterr().err
