"""Models: backbones cropped to dense features, the NetVLAD layer and its pooling baselines, the place model."""

from .backbones import Backbone, build_backbone
from .build import ModelConfig, PlaceModel, build_model, load_model, save_model
from .netvlad import NetVLAD, NetVLADLinear
from .pooling import AvgPool, GeM, MaxPool, build_pooling

__all__ = [
    "AvgPool",
    "Backbone",
    "GeM",
    "MaxPool",
    "ModelConfig",
    "NetVLAD",
    "NetVLADLinear",
    "PlaceModel",
    "build_backbone",
    "build_model",
    "build_pooling",
    "load_model",
    "save_model",
]
