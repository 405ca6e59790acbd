"""CompConv: a compact convolution module (Zhang, Xu, Shen, CVPR-W 2021), for timm and torchvision models.

Importing this package registers the CompConv models with timm. It never imports Hydra or wandb.
"""

from .complexity import ComplexityReport, complexity
from .checks import DeployError
from .efficient import EfficientCompConv2d
from .export import ExportError, ExportReport, export_onnx
from .ghost import GhostConv2d
from .factory import create_conv2d
from .inference import DeployReport, deploy
from .layers import CompConv2d
from .models import compconv_model_names
from .options import CompConvOptions
from .patch import PatchReport, patch
from .shuffle import channel_shuffle
from .sizing import CompConvPlan, Part, adaptive_depth, c_prim_for, plan

__version__ = "0.1.0"

__all__ = [
    "CompConv2d", "CompConvOptions", "DeployError", "EfficientCompConv2d", "ExportError", "CompConvPlan", "ComplexityReport", "DeployReport", "ExportReport", "GhostConv2d", "Part",
    "PatchReport", "adaptive_depth", "c_prim_for", "channel_shuffle", "complexity", "compconv_model_names", "deploy",
    "create_conv2d", "export_onnx", "patch", "plan",
]
