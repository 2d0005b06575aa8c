"""Real photographs for the tests (the maker lives in data/photos.py, which tools/benchmark.py uses too)."""
from data.photos import random_crop, sample_photos, write_photo_folder  # noqa: F401
