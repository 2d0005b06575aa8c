"""Write tests/fixtures/mmseg/: what mmsegmentation itself computes for a small UPerNet, for
tests/test_segmentation_reference.py to compare this codebase's segmentor against.

Run in the reference environment (requirements-mmref.txt), from the repository root:

    .venv-mmref/bin/python tests/mmref/make_mmseg_fixtures.py

Files written (the model and what is recorded: tests/mmref/mmseg_fixtures.py):

- upernet.pth      the weights in the released layout: {'meta', 'state_dict'}
- heads.pt         decode and auxiliary heads' logits on given backbone maps, two input sizes
- inference.pt     whole-image, sliding-window and multi-scale + flip predictions on a photo
- losses.pt        the training losses on one batch, and the zero-label reduction of a label map
- transforms.pt    the training transforms on photos: outputs for recorded random draws, and
                   the distribution of the draws over many samples
- meta.json        versions, model settings, test settings
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / 'tests' / 'fixtures' / 'mmseg'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Write the mmsegmentation reference fixtures.')
    parser.add_argument('--out', type=Path, default=OUT,
                        help=f'where to write them (default {OUT.relative_to(ROOT)})')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(2)  # the count the tests compare on (tests/conftest.py FIXTURE_THREADS)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mmseg_fixtures  # needs mmsegmentation: imported only to run
    mmseg_fixtures.write(args.out)


if __name__ == '__main__':
    main()
