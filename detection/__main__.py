"""``python -m detection ...`` (also under torchrun and the legacy launcher); see detection/train.py."""
import sys

from .train import main

if __name__ == '__main__':
    sys.exit(main())
