"""Inputs that fight back: image folders with link loops, links across classes, FIFOs and empty classes;
map files and zips that are not what they claim; an output path that cannot be written; and the
messages a user gets for each (one line, in command-line terms)."""
import logging
import os
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.robust import RobustImageFolder
from errors import UserError
from tiny_runs import call_main, main_args, make_image_folder, run_dir


# ------------------------------------------------------------------------------ image folders

def test_listing_keeps_torchvisions_order(tmp_path):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    make_image_folder(tmp_path / 'b', classes=('x', 'y'), per_class=3)
    make_image_folder(tmp_path / 'b' / 'x', classes=('deeper',), per_class=2)
    make_image_folder(tmp_path, classes=('a', 'c'), per_class=2)
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    _, class_to_idx = find_classes(str(tmp_path))
    ds = RobustImageFolder(str(tmp_path))
    assert ds.samples == make_dataset(str(tmp_path), class_to_idx, IMG_EXTENSIONS)


@pytest.mark.parametrize('link, target', [
    ('a/loop', '..'),          # back to the root: every class again, inside class a
    ('a/self', '.'),           # to itself: the images of a, again and again
    ('a/more', '../b'),        # another class's folder: b's images relabelled as a
])
def test_a_folder_reached_twice_is_an_error_naming_the_link(tmp_path, link, target):
    make_image_folder(tmp_path, per_class=2)
    os.symlink(target, tmp_path / link)
    with pytest.raises(UserError, match='again \\(through a symbolic link\\).*remove the link') as info:
        RobustImageFolder(str(tmp_path))
    assert str(tmp_path / link) in str(info.value)


def test_a_file_linked_into_another_class_is_an_error(tmp_path):
    make_image_folder(tmp_path, per_class=2)
    os.symlink(tmp_path / 'b' / '0.png', tmp_path / 'a' / 'also.png')
    with pytest.raises(UserError, match='are the same image file'):
        RobustImageFolder(str(tmp_path))


def test_linked_class_folders_and_files_elsewhere_are_fine(tmp_path):
    """What links are for: a data set assembled from folders and files stored elsewhere."""
    store = make_image_folder(tmp_path / 'store', per_class=2)
    (tmp_path / 'data' / 'b').mkdir(parents=True)
    os.symlink(store / 'a', tmp_path / 'data' / 'a')
    os.symlink(store / 'b' / '1.png', tmp_path / 'data' / 'b' / 'x.png')
    ds = RobustImageFolder(str(tmp_path / 'data'))
    assert [(Path(p).name, t) for p, t in ds.samples] == [('0.png', 0), ('1.png', 0), ('x.png', 1)]


def test_fifos_and_broken_links_are_passed_over_and_empty_classes_named(tmp_path, caplog):
    make_image_folder(tmp_path, classes=('a', 'b'), per_class=2)
    (tmp_path / 'empty').mkdir()
    os.mkfifo(tmp_path / 'a' / 'pipe.jpg')  # reading it would wait for ever
    os.symlink(tmp_path / 'gone.png', tmp_path / 'b' / 'broken.png')
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        ds = RobustImageFolder(str(tmp_path))
    assert [Path(p).name for p, _ in ds.samples] == ['0.png', '1.png', '0.png', '1.png']
    assert ds.class_to_idx == {'a': 0, 'b': 1, 'empty': 2}
    warned = '\n'.join(r.getMessage() for r in caplog.records)
    assert f'passing over 2 name(s) with an image extension that are not regular files' in warned
    assert str(tmp_path / 'a' / 'pipe.jpg') in warned and str(tmp_path / 'b' / 'broken.png') in warned
    assert '1 class folder(s) without images: empty' in warned


# ---------------------------------------------------------------------------------- zipped layout

def _zip_set(root: Path, map_lines: bytes) -> Path:
    with zipfile.ZipFile(root / 'train.zip', 'w') as z:
        for i in range(3):
            buf = BytesIO()
            Image.new('RGB', (8, 8), (80 * i, 0, 0)).save(buf, format='PNG')
            z.writestr(f'c/{i}.png', buf.getvalue())
    (root / 'train_map.txt').write_bytes(map_lines)
    return root


@pytest.mark.parametrize('lines, message', [
    (b'train.zip@/c/0.png\t-1\n', 'train_map.txt:1: expected "<image name>\\t<class index>" with a class '
                                  "index of 0 or more, got 'train.zip@/c/0.png\\t-1'"),
    (b'c/0.png\t0\nc/1.png\tseven\n', "train_map.txt:2: expected"),
    ('c/0.png\t\u00b2\n'.encode(), 'train_map.txt:1: expected'),  # a superscript two is no index
    (b'c/0.png\t0\nc/\xe9.png\t1\n', 'train_map.txt:2: not UTF-8 text (byte 0xe9 at column 3); map files are UTF-8'),
])
def test_map_file_mistakes_name_the_line(tmp_path, lines, message):
    from data import ZipImageDataset
    root = _zip_set(tmp_path, lines)
    with pytest.raises(UserError) as info:
        ZipImageDataset(str(root / 'train.zip'), str(root / 'train_map.txt'))
    assert message in str(info.value)


def test_a_train_zip_that_is_no_zip_and_unused_class_indices(tmp_path, caplog):
    from data import ZipImageDataset
    root = _zip_set(tmp_path, b'c/0.png\t0\nc/1.png\t4\n')
    with caplog.at_level(logging.WARNING, logger='focalnet'):
        ds = ZipImageDataset(str(root / 'train.zip'), str(root / 'train_map.txt'))
    assert ds.num_classes == 5
    assert any('3 of the class indices 0..4 have no images: 1, 2, 3' in r.getMessage() for r in caplog.records)
    (root / 'train.zip').write_bytes(b'PK but not really a zip file')
    with pytest.raises(UserError, match='train.zip is not a readable zip file'):
        ZipImageDataset(str(root / 'train.zip'), str(root / 'train_map.txt'))


# ----------------------------------------------------------------------------- whole runs

def test_a_validation_set_with_every_image_skipped_is_an_error(tiny_cfg, tiny_data, tmp_path, capsys):
    make_image_folder(tmp_path / 'data' / 'train', per_class=4)
    val = make_image_folder(tmp_path / 'data' / 'val', per_class=2)
    for image in val.rglob('*.png'):
        image.write_bytes(b'\x89PNG but truncated')
    code, err = call_main(main_args(tiny_cfg, tmp_path / 'data', tmp_path, 'DATA.SKIP_CORRUPT', 'True'), capsys)
    assert code == 2
    assert err.startswith('error: no validation image could be read: all were skipped as unreadable, '
                          f'for example {val}/')
    # Nothing lost: the epoch trained before the validation is saved; no accuracy was recorded.
    assert sorted(p.name for p in run_dir(tmp_path).glob('ckpt_*')) == ['ckpt_epoch_0.pth']
    assert not (run_dir(tmp_path) / 'metrics.jsonl').exists()


def test_an_output_path_through_a_file_is_one_line(tiny_cfg, tiny_data, tmp_path, capsys):
    (tmp_path / 'out').write_text('a file where the output folder should go')
    for extra in ([], ['--eval', '--resume', 'x.pth']):
        code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path / 'out') + extra, capsys)
        assert code == 2
        assert err == f'error: cannot create the output folder {run_dir(tmp_path / "out")}: ' \
                      f'{tmp_path / "out"} is a file, not a folder\n'


@pytest.mark.parametrize('error, reason', [
    (PermissionError(13, 'Permission denied'), 'Permission denied'),  # (root may write anywhere)
    (OSError(28, 'No space left on device'), 'no space left on the device'),
])
def test_an_output_folder_that_cannot_be_written_is_found_before_any_work(tmp_path, monkeypatch, error,
                                                                          reason):
    import builtins
    import engine.folders as folders

    def refuse(path, *args, **kwargs):
        if '.write_test.' in str(path):
            raise error
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(folders, 'open', refuse, raising=False)
    with pytest.raises(UserError) as info:
        folders.ensure_writable_dir(str(tmp_path / 'out'))
    assert str(info.value) == f'cannot write to the output folder {tmp_path / "out"}: {reason}'
    assert list((tmp_path / 'out').iterdir()) == []


def test_a_full_disk_stops_in_one_line(tiny_cfg, tiny_data, tmp_path, capsys):
    # /dev/full fails every write with ENOSPC: the log file and metrics.jsonl live on a full disk.
    folder = run_dir(tmp_path)
    folder.mkdir(parents=True)
    os.symlink('/dev/full', folder / 'log_rank0.txt')
    os.symlink('/dev/full', folder / 'metrics.jsonl')
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path, 'TRAIN.EPOCHS', '1'), capsys)
    assert code == 3
    assert err.splitlines() == [
        f'warning: cannot write the log file {folder / "log_rank0.txt"}: No space left on device',
        f'training stopped: no space left on the device for {folder / "metrics.jsonl"}; the checkpoints '
        f'already in the folder are intact']


# --------------------------------------------------------------------------------- messages

def test_a_checkpoint_that_does_not_fit_is_listed_key_by_key(tmp_path):
    from models import FocalNet
    from engine.resume import load_checkpoint
    path = tmp_path / 'wide.pth'
    wide = FocalNet(embed_dim=16, depths=(1, 1, 1, 1), num_classes=3).state_dict()
    torch.save({'model': wide}, path)
    model = FocalNet(embed_dim=8, depths=(1, 1, 1, 2), num_classes=3)  # narrower, one block more
    with pytest.raises(UserError) as info:
        load_checkpoint(str(path), model=model)
    lines = str(info.value).splitlines()
    missing = [k for k in model.state_dict() if k not in wide]
    other = [k for k, v in model.state_dict().items() if k in wide and wide[k].shape != v.shape]
    assert len(missing) == 16 and len(other) == 83
    assert lines[0] == f'checkpoint {path} does not fit the model:'
    assert lines[1] == '  16 missing from the file:'
    assert lines[2] == f'    {missing[0]} {list(model.state_dict()[missing[0]].shape)}'
    assert lines[12] == '    ... and 6 more'
    assert lines[13] == '  83 of another shape:'
    assert lines[14] == '    patch_embed.proj.weight file [16, 3, 4, 4] vs model [8, 3, 4, 4]'
    assert '    ... and 73 more' in lines
    assert lines[-1].startswith('  (was it trained with another config? give the --cfg and --opts')


def test_evaluation_names_the_weights_and_their_classifier_in_command_line_terms(tiny_cfg, tiny_data, tmp_path,
                                                                                 uninterrupted, capsys):
    code, err = call_main(main_args(tiny_cfg, tiny_data, tmp_path) + ['--eval', '--resume', uninterrupted],
                          capsys)
    assert code == 0, err
    log = (run_dir(tmp_path) / 'log_rank0.txt').read_text()
    assert f'evaluating {uninterrupted} (trained 2 epochs)' in log
    assert f'{uninterrupted}: top-1 ' in log and ' on 4 images' in log
    # Released-style weights of two classes, evaluated on three: say so, in command-line terms.
    three = make_image_folder(tmp_path / 'three' / 'val', classes=('a', 'b', 'c'), per_class=1).parent
    code, err = call_main(main_args(tiny_cfg, three, tmp_path) + ['--eval', '--pretrained', uninterrupted],
                          capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert 'the classifier does not match: head.weight file [2, 64] vs model [3, 64]' in err
    assert 'the data set has 3 classes; evaluate on a data set with the weights\' classes, or fine-tune ' \
           'them on this one (train with --pretrained, without --eval)' in err
    assert 'replace_classifier' not in err
