"""Image classification: the training loop and validation of main.py."""
