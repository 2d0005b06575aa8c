from .focalnet import FocalModulation, FocalNet, FocalNetBlock
from .registry import build_model, create_model, list_models, model_kwargs_from_config
