"""python -m segmentation: see segmentation/train.py."""
import sys

from .train import main

sys.exit(main())
