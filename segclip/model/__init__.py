"""The SegCLIP model on open_clip, its checkpoints and its parameter groups."""

from segclip.model.checkpoint import (
    load_checkpoint,
    load_model,
    load_reference_checkpoint,
    named_model,
    save_checkpoint,
)
from segclip.model.params import freeze_parameters, parameter_groups, parameter_role
from segclip.model.segclip import (
    CaptionTokenizer,
    ImageEncoding,
    SegCLIP,
    TrainOutputs,
    VisionMode,
    build_model,
)

__all__ = [
    "CaptionTokenizer",
    "ImageEncoding",
    "SegCLIP",
    "TrainOutputs",
    "VisionMode",
    "build_model",
    "freeze_parameters",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "named_model",
    "parameter_groups",
    "parameter_role",
    "save_checkpoint",
]
