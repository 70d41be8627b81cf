"""timm-exits: multi-exit networks from any timm or torchvision classifier."""
from .export import ExitStep, ExportedExits, ExportError, exit_steps, export_exits
from .ensemble import ExitEnsemble, anytime_ensemble, exit_ensemble
from .flops import ExitCost, FlopsReport, flops_report
from .inference import Calibration, EarlyExitResult, early_exit
from .calibration import (
    CachedExits,
    anytime_accuracy,
    budgeted_curve,
    calibrate_thresholds,
    collect_exit_logits,
    evaluate_thresholds,
    plot_tradeoff,
)
from .evaluation import ExitAccuracy, ExitEvaluation, OperatingPoint, evaluate_exits
from .placement import FlopsPlacement, at_flops
from .profile import ExitProfile, HostSyncs, host_syncs, profile_exits
from .hub import create_model, export_backbone, from_pretrained, save_pretrained
from .diagram import plot_exits
from .temperature import TemperatureFit, calibrate_temperature, expected_calibration_error
from .ztw import GeometricEnsemble, fit_geometric_ensemble
from .compiled import compile_exits
from .stream import early_exit_stream
from .integrations import MultiExitTask, MultiExitTrainable
from .heads import create_head, head_names, register_head
from .losses import (
    AppropriateTeachersLoss,
    DistillationBasedLoss,
    EnsembleKnowledgeDistillationLoss,
    ExitEnsembleLoss,
    MultiExitCELoss,
    MultiExitLoss,
    MultiSelfDistillationLoss,
    SelfDistillationLoss,
)
from .presets import create_loss, loss_names
from .model import ExitOutputs, MultiExitModel, wrap
from .stages import FeatureLayout, Stage, list_stages
from .tracing import TraceError, graph_node_names

__all__ = [
    "wrap",
    "create_model",
    "save_pretrained",
    "from_pretrained",
    "export_backbone",
    "MultiExitModel",
    "ExitOutputs",
    "list_stages",
    "graph_node_names",
    "Stage",
    "FeatureLayout",
    "TraceError",
    "create_head",
    "head_names",
    "register_head",
    "MultiExitLoss",
    "MultiExitCELoss",
    "DistillationBasedLoss",
    "ExitEnsembleLoss",
    "SelfDistillationLoss",
    "MultiSelfDistillationLoss",
    "AppropriateTeachersLoss",
    "EnsembleKnowledgeDistillationLoss",
    "create_loss",
    "loss_names",
    "ExitEnsemble",
    "exit_ensemble",
    "anytime_ensemble",
    "flops_report",
    "FlopsReport",
    "ExitCost",
    "at_flops",
    "FlopsPlacement",
    "early_exit",
    "EarlyExitResult",
    "collect_exit_logits",
    "CachedExits",
    "calibrate_thresholds",
    "evaluate_thresholds",
    "Calibration",
    "anytime_accuracy",
    "budgeted_curve",
    "plot_tradeoff",
    "evaluate_exits",
    "ExitEvaluation",
    "ExitAccuracy",
    "OperatingPoint",
    "plot_exits",
    "calibrate_temperature",
    "TemperatureFit",
    "expected_calibration_error",
    "GeometricEnsemble",
    "fit_geometric_ensemble",
    "profile_exits",
    "host_syncs",
    "HostSyncs",
    "compile_exits",
    "early_exit_stream",
    "ExitProfile",
    "MultiExitTask",
    "MultiExitTrainable",
    "export_exits",
    "exit_steps",
    "ExportedExits",
    "ExitStep",
    "ExportError",
]

__version__ = "0.1.0"
