"""Exit heads: the registry (`create_head`, `register_head`), the built-in heads and Zero Time Waste's cascade."""
from .builtin import BottleneckHead, ConvHead, FeaturePool, LinearHead, ReplicaHead, SDNHead
from .cascade import CascadedHead
from .exit_heads import ExitHeads, head_kind
from .registry import check_head, create_head, head_names, register_head
