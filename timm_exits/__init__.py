"""timm-exits: multi-exit networks from any timm or torchvision classifier.

The public API, by folder, in the order the layers build on each other (docs/architecture.md):
fx (tracing and cutting) -> heads -> model -> losses, cost -> runtime -> calibration -> deploy -> plots, integrations.
"""
from .calibration import (
    CachedExits,
    ExitAccuracy,
    ExitEvaluation,
    OperatingPoint,
    anytime_accuracy,
    budgeted_curve,
    calibrate_temperature,
    calibrate_thresholds,
    collect_exit_logits,
    evaluate_exits,
    evaluate_thresholds,
    expected_calibration_error,
    fit_geometric_ensemble,
)
from .cost import ExitCost, ExitProfile, FlopsPlacement, FlopsReport, HostSyncs, at_flops, flops_report, host_syncs, profile_exits
from .deploy import ExportedExits, ExportError, create_model, exit_steps, export_backbone, export_exits, from_pretrained, save_pretrained
from .ensemble import ExitEnsemble, GeometricEnsemble, anytime_ensemble, exit_ensemble
from .fx import FeatureLayout, Stage, TraceError, graph_node_names, list_stages
from .heads import create_head, head_names, register_head
from .integrations import MultiExitTask, MultiExitTrainable
from .losses import (
    AppropriateTeachersLoss,
    DistillationBasedLoss,
    EnsembleKnowledgeDistillationLoss,
    ExitEnsembleLoss,
    MultiExitCELoss,
    MultiExitLoss,
    MultiSelfDistillationLoss,
    SelfDistillationLoss,
    create_loss,
    loss_names,
)
from .model import ExitOutputs, ExitStep, MultiExitModel, wrap
from .plots import plot_exits, plot_tradeoff
from .runtime import Calibration, EarlyExitResult, TemperatureFit, compile_exits, early_exit, early_exit_stream
from .version import __version__

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
