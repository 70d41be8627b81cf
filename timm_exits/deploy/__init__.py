"""Shipping a wrapped model: torch.export of its steps, and saved folders and checkpoints (save/load, create_model)."""
from .checkpoints import export_backbone
from .early_exit_graph import EarlyExitGraph, export_early_exit, export_onnx
from .export import ExportedExits, ExportError, exit_steps, export_exits
from .hub import create_model, from_pretrained, save_pretrained
