"""tools/predict.py on real JPEG photos, against timm's own FocalNet and evaluation transform."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import create_model
from models.pretrained import to_hf, to_timm
from tools import predict

SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1))
SMALL_OPTS = ['--opts', 'MODEL.FOCAL.EMBED_DIM', '16', 'MODEL.FOCAL.DEPTHS', '[1, 1, 2, 1]']
SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (350, 500)]  # ImageNet-like (W, H)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """Random crops of scikit-learn's two sample photos, resized to ImageNet-like sizes and
    re-encoded as JPEG in a folder tree, with a truncated JPEG, a text file named .jpg and a
    non-image file beside them."""
    from sklearn.datasets import load_sample_images
    root = tmp_path_factory.mktemp('photos')
    (root / 'holiday' / 'day2').mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = load_sample_images().images
    paths = []
    for i, size in enumerate(SIZES):
        src = sources[i % 2]
        h, w = src.shape[:2]
        ch, cw = rng.integers(h // 2, h), rng.integers(w // 2, w)
        top, left = rng.integers(0, h - ch), rng.integers(0, w - cw)
        crop = Image.fromarray(src[top:top + ch, left:left + cw]).resize(size, Image.BICUBIC)
        folder = root / 'holiday' / ('day2' if i >= 3 else '')
        path = folder / f'photo_{i}.jpg'
        crop.save(path, quality=90)
        paths.append(path)
    good = paths[0].read_bytes()
    (root / 'holiday' / 'truncated.jpg').write_bytes(good[:len(good) // 3])
    (root / 'holiday' / 'day2' / 'notes.jpg').write_text('not an image')
    (root / 'holiday' / 'readme.txt').write_text('not looked at: not an image extension')
    return root, paths


@pytest.fixture(scope='module')
def small_model():
    torch.manual_seed(0)
    model = create_model('focalnet_tiny_srf', **SMALL).eval()
    with torch.no_grad():  # weights far from the initialisation, so the classes are told apart
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def timm_reference(model, paths, crop_pct=0.875):
    """Class probabilities from timm's FocalNet with the same weights, through timm's own
    evaluation transform (resize 256, centre crop 224, bicubic, ImageNet mean and std)."""
    from timm.data import create_transform, resolve_data_config
    from timm.models.focalnet import _create_focalnet
    t = _create_focalnet('focalnet_tiny_srf', **SMALL).eval()
    t.load_state_dict(to_timm(model.state_dict(), use_postln=False), strict=True)
    transform = create_transform(**resolve_data_config({'crop_pct': crop_pct}, model=t))
    images = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
    with torch.no_grad():
        return t(images).softmax(-1)


def run(capsys, argv):
    code = predict.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_against(results, reference, paths, topk):
    assert [r['image'] for r in results] == [str(p) for p in paths]
    for result, probs in zip(results, reference):
        preds = result['predictions']
        assert [p['rank'] for p in preds] == list(range(1, topk + 1))
        ours = torch.tensor([p['probability'] for p in preds])
        at_ours = probs[[p['class'] for p in preds]]
        torch.testing.assert_close(ours, at_ours, atol=1e-5, rtol=1e-4)   # our classes, their probabilities
        torch.testing.assert_close(ours, probs.topk(topk).values, atol=1e-5, rtol=1e-4)  # the top k


def test_folder_with_broken_files(photos, small_model, tmp_path, capsys):
    root, paths = photos
    weights = tmp_path / 'w.pth'
    torch.save({'model': small_model.state_dict()}, weights)
    out_json, out_csv = tmp_path / 'p.json', tmp_path / 'p.csv'
    code, out, err = run(capsys, [str(root), '--model', 'focalnet_tiny_srf', '--checkpoint', str(weights),
                                  '--topk', '3', '--batch-size', '2', '--json', str(out_json),
                                  '--csv', str(out_csv)] + SMALL_OPTS)
    assert code == 1  # some images could not be read; the others were predicted
    doc = json.loads(out_json.read_text())
    ordered = sorted(paths)  # a folder is read in sorted order
    check_against(doc['results'], timm_reference(small_model, ordered), ordered, 3)

    # Class names: timm's ImageNet-1K list, whose first class is the tench.
    from timm.data import ImageNetInfo
    info = ImageNetInfo('imagenet-1k')
    assert (info.index_to_label_name(0), info.index_to_description(0)) == ('n01440764', 'tench, Tinca tinca')
    assert doc['labels'] == 'imagenet-1k'
    for pred in (p for r in doc['results'] for p in r['predictions']):
        assert (pred['label'], pred['name']) == (info.index_to_label_name(pred['class']),
                                                 info.index_to_description(pred['class']))

    # The unreadable files are listed with a reason; the .txt file is not an image and not tried.
    failed = {e['image'].rsplit('/', 1)[-1]: e['error'] for e in doc['errors']}
    assert set(failed) == {'truncated.jpg', 'notes.jpg'}
    assert 'truncated' in failed['truncated.jpg'] and 'cannot identify' in failed['notes.jpg']
    assert 'could not read 2 of 7 images' in err and 'truncated.jpg' in err and 'notes.jpg' in err
    assert 'predicting' in err and '7/7' in err  # the progress bar of a folder

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 3 * len(paths)
    assert rows[0]['label'] == doc['results'][0]['predictions'][0]['label']
    first = doc['results'][0]['predictions'][0]
    assert float(rows[0]['probability']) == pytest.approx(first['probability'], rel=1e-5)
    for result in doc['results']:  # the table on the terminal
        top = result['predictions'][0]
        assert f'{result["image"]}\n   1  {100 * top["probability"]:6.2f}%' in out
        assert top['name'] in out


def test_files_and_globs_any_layout_same_predictions(photos, small_model, tmp_path, capsys):
    root, paths = photos
    files = {'timm': to_timm(small_model.state_dict(), use_postln=False),
             'hf': to_hf(small_model.state_dict())}
    outputs = []
    for layout, state in files.items():
        weights = tmp_path / f'{layout}.pth'
        torch.save(state, weights)
        code, out, err = run(capsys, [str(paths[0]), str(root / 'holiday' / 'day2' / '*.jpg'),
                                      '--model', 'focalnet_tiny_srf', '--checkpoint', str(weights),
                                      '--json', '-', '--workers', '0', '--no-progress'] + SMALL_OPTS)
        assert code == 1 and 'notes.jpg' in err  # the pattern matched the text file too
        outputs.append(json.loads(out))
    assert outputs[0]['results'] == outputs[1]['results']
    named = [paths[0]] + sorted(paths[3:])
    check_against(outputs[0]['results'], timm_reference(small_model, named), named, 5)


def test_22k_names(photos, tmp_path, capsys):
    """A 21842-class model gets the ImageNet-22K release order, whose first 1000 classes are
    ImageNet-1K's (the official note: the first 1k logits evaluate on ImageNet-1K)."""
    from timm.data import ImageNetInfo
    names, source = predict.class_names(21842)
    assert source == 'imagenet-22k-ms' and len(names) == 21842
    assert [n for n, _ in names[:1000]] == ImageNetInfo('imagenet-1k').label_names()
    torch.manual_seed(0)
    model = create_model('focalnet_large_fl3', embed_dim=16, depths=(1, 1, 1, 1))
    weights = tmp_path / 'w.pth'
    torch.save({'model': model.state_dict()}, weights)
    _, paths = photos
    code, out, _ = run(capsys, [str(paths[1]), '--model', 'focalnet_large_fl3', '--checkpoint',
                                str(weights), '--img-size', '224', '--json', '-', '--workers', '0',
                                '--opts', 'MODEL.FOCAL.EMBED_DIM', '16',
                                'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]'])
    assert code == 0
    doc = json.loads(out)
    assert doc['labels'] == 'imagenet-22k-ms'
    for p in doc['results'][0]['predictions']:
        assert (p['label'], p['name']) == names[p['class']]


def test_classes_follow_the_checkpoint_and_custom_labels(photos, small_model, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model('focalnet_tiny_srf', num_classes=3, **SMALL)
    weights = tmp_path / 'w.pth'
    torch.save({'model': model.state_dict()}, weights)
    labels = tmp_path / 'labels.txt'
    labels.write_text('cat\ndog\nflower\n')
    _, paths = photos
    code, out, _ = run(capsys, [str(paths[0]), '--model', 'focalnet_tiny_srf', '--checkpoint', str(weights),
                                '--labels', str(labels), '--csv', '-', '--workers', '0'] + SMALL_OPTS)
    assert code == 0
    rows = list(csv.DictReader(out.splitlines()))
    assert len(rows) == 3 and {r['label'] for r in rows} == {'cat', 'dog', 'flower'}
    assert sum(float(r['probability']) for r in rows) == pytest.approx(1.0, abs=1e-5)


def test_mistakes_are_one_line_with_status_2(photos, small_model, tmp_path, capsys):
    root, paths = photos
    weights = tmp_path / 'w.pth'
    torch.save({'model': small_model.state_dict()}, weights)
    base = ['--model', 'focalnet_tiny_srf', '--checkpoint', str(weights)] + SMALL_OPTS
    for argv, words in [
        ([str(root / 'missing.jpg')] + base, ['not found', 'missing.jpg']),
        ([str(root / 'nothing' / '*.jpg')] + base, ['no file matches']),
        ([str(paths[0]), '--topk', '0'] + base, ['--topk']),
        ([str(paths[0]), '--labels', 'imagenet-5k'] + base, ['--labels', 'imagenet-5k']),
        ([str(paths[0]), '--model', 'focalnet_tiny_srf', '--checkpoint', str(tmp_path / 'none.pth')],
         ['checkpoint not found']),
        ([str(paths[0]), '--model', 'focalnet_tiny_srf', '--checkpoint', str(weights)],  # not small
         ['cannot load', 'does not fit']),
    ]:
        code, _, err = run(capsys, argv)
        assert code == 2, argv
        assert err.startswith('tools/predict.py: error:') and 'Traceback' not in err
        assert all(w in err for w in words), err
