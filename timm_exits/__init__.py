"""timm-exits: multi-exit networks from any timm or torchvision classifier."""
from .heads import create_head, head_names, register_head
from .model import ExitOutputs, MultiExitModel, wrap
from .stages import FeatureLayout, Stage, list_stages
from .tracing import TraceError, graph_node_names

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
