import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tiny_runs import TINY_RUN, main_args, make_image_folder, run_dir, run_main  # noqa: E402

# Data made with the official implementation; see its README. FOCALNET_REFERENCE overrides the place.
REFERENCE = Path(os.environ.get('FOCALNET_REFERENCE', ROOT.parent / 'shared' / 'reference'))


@pytest.fixture(scope='session')
def reference() -> Path:
    if not (REFERENCE / 'README.md').is_file():
        pytest.fail(f'reference data not found at {REFERENCE}; set FOCALNET_REFERENCE')
    return REFERENCE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def readme_run(tmp_path_factory):
    """README.md's CPU commands (the quick start, then the tools on its model) run as written in a
    scratch folder (tests/doc_blocks.py): (folder, [(block, finished process)]). tests/test_docs.py
    checks them; tests/test_engine.py's digits runs are this quick start."""
    from doc_blocks import run_page
    folder = tmp_path_factory.mktemp('readme')
    return folder, run_page(ROOT / 'README.md', folder)


# ---- small training runs shared by several test files (see tiny_runs.py) ---------------------------

@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('data')
    make_image_folder(root / 'train', per_class=8)
    make_image_folder(root / 'val', per_class=2, seed=1)
    return root


@pytest.fixture(scope='session')
def tiny_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('cfg') / 'tiny.yaml'
    path.write_text(TINY_RUN)
    return path


@pytest.fixture(scope='session')
def uninterrupted(tiny_cfg, tiny_data, tmp_path_factory) -> Path:
    """The final checkpoint of a run never interrupted."""
    out = tmp_path_factory.mktemp('uninterrupted')
    done = run_main(main_args(tiny_cfg, tiny_data, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir(out) / 'ckpt_epoch_1.pth'


@pytest.fixture(scope='session')
def photo_folder(tmp_path_factory):
    """photo_folder(n_train, n_val=0): an ImageFolder tree of random JPEG crops (120-500 px, aspects
    from about 1:4 to 4:1) of scikit-learn's two sample photos, one class per photo (tests/photos.py).
    Each (n_train, n_val) is written once per session."""
    from photos import write_photo_folder
    made = {}

    def make(n_train: int, n_val: int = 0) -> Path:
        if (n_train, n_val) not in made:
            made[n_train, n_val] = write_photo_folder(tmp_path_factory.mktemp('photos'), n_train, n_val)
        return made[n_train, n_val]
    return make


@pytest.fixture
def one_thread():
    """torch on one thread, as in a loader worker: per-image transforms are tiny tensor operations,
    which a thread pool only slows down (badly so on a busy machine)."""
    with torch_threads(1):
        yield


# The mmdetection / mmsegmentation fixtures were generated with torch on 2 threads (the 2-core machine's
# default). Float reductions split across threads in another order can swap near-tied random-weight
# detections, so the comparisons run on that same count, whatever the machine.
FIXTURE_THREADS = 2


@contextmanager
def torch_threads(count: int):
    """torch on ``count`` threads inside the block; the caller's count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fixture_threads():
    with torch_threads(FIXTURE_THREADS):
        yield


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    """The detection tests' synthetic COCO-layout set (tests/test_detection.py make_split): 64 training
    and 24 validation images, one per test module."""
    from test_detection import make_split
    root = tmp_path_factory.mktemp('coco')
    rng = np.random.default_rng(0)
    make_split(root, 'train2017', 64, rng, 1000)
    make_split(root, 'val2017', 24, rng, 50000)
    return root
