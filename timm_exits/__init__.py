"""timm-exits: multi-exit networks from any timm or torchvision classifier."""
from .heads import create_head, head_names, register_head
from .model import ExitOutputs, MultiExitModel, wrap
from .surgery import FeatureLayout, Stage, TraceError, graph_node_names, list_stages

__all__ = [
    "wrap",
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
]

__version__ = "0.1.0"
