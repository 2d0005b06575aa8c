import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
