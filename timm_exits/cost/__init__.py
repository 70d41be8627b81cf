"""What each exit costs: FLOPs (fvcore), measured seconds and host syncs, and exits placed by their share of FLOPs."""
from .flops import flops_report
from .handles import FLOP_HANDLES
from .placement import FlopsPlacement, at_flops
from .profile import ExitProfile, HostSyncs, host_syncs, profile_exits
from .report import ExitCost, FlopsReport
