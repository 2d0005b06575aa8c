from .focalnet import FocalModulation, FocalNet, FocalNetBlock
from .registry import build_model, create_model, list_models, model_kwargs_from_config
from .pretrained import CheckpointError, convert_state_dict, load_pretrained, read_state_file
from .dense import FocalNetDense, build_dense_backbone, init_from_classification, load_dense_checkpoint
