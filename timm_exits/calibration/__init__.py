"""Choosing thresholds on held-out data: cached exits, budgets, accuracy targets with guarantees, temperatures, curves."""
from .cached import CachedExits, collect_exit_logits
from .curves import AnytimePoint, CurvePoint, anytime_accuracy, budgeted_curve
from .evaluation import ExitAccuracy, ExitEvaluation, OperatingPoint, evaluate_exits
from .geometric import fit_geometric_ensemble
from .temperature import calibrate_temperature, expected_calibration_error
from .thresholds import calibrate_thresholds, evaluate_thresholds
