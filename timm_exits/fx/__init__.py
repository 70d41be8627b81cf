"""torch.fx only, knowing nothing of exits: tracing, the stage table, and cutting a graph into segments."""
from .stages import FeatureLayout, Stage, list_stages
from .surgery import ExitPlan, ExitSite, plan_exits
from .tracing import TraceError, TraceOptions, graph_node_names
