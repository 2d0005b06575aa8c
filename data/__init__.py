"""Data sets, transforms and loaders for training and evaluation."""
from .datasets import FakeImages, ZipImageDataset, build_dataset
from .loader import Loaders, build_loader, build_mixup
from .transforms import build_train_transform, build_transform
