"""Normalizer-free networks (NFNet-F*, NF-ResNet), Adaptive Gradient Clipping and their SGD in pure PyTorch."""

from nfnet import optim
from nfnet.agc import AGCStats, adaptive_grad_clip_, agc_parameters
from nfnet.augment import Augment
from nfnet.models import MODELS, create_model, list_models, model_config
from nfnet.signal import BlockSignal, signal_propagation

__all__ = ["MODELS", "AGCStats", "Augment", "BlockSignal", "adaptive_grad_clip_", "agc_parameters",
           "create_model", "list_models", "model_config", "optim", "signal_propagation"]
