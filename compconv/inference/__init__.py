"""Inference forms of CompConv models: :func:`deploy` (``pipeline.py``) rewrites a model with folds proven on its
traced dataflow (``graph.py``), each 1x1 layer in its fastest exact form (timed in ``timing.py``, built by
:mod:`compconv.lowrank`) and chain layers as :class:`DeployedCompConv2d` (``forms.py``), and checks the result.
"""

from ..checks import DeployError, tolerance_for
from ..lowrank import FORMS, LowRankConv2d, build_form, form_macs, rule_choice
from .forms import DeployedCompConv2d, absorb_norm, fold_shuffle, permute_input
from .pipeline import ROUNDING_SHARE, DeployReport, LayerChoice, check_outputs, default_input, deploy, rounding_error
from .timing import ChoiceCache, interleaved_times, measured_choice

__all__ = ["FORMS", "ROUNDING_SHARE", "ChoiceCache", "DeployError", "DeployReport", "DeployedCompConv2d",
           "LayerChoice", "LowRankConv2d", "absorb_norm", "build_form", "check_outputs", "default_input", "deploy",
           "fold_shuffle", "form_macs", "interleaved_times", "measured_choice", "permute_input", "rounding_error",
           "rule_choice", "tolerance_for"]
