"""Running a wrapped model with early exits: confidence criteria, `early_exit`, the stream and compiled steps."""
from .compiled import compile_exits
from .criteria import CRITERIA, Calibration, TemperatureFit, exit_confidence
from .early_exit import EarlyExitResult, early_exit
from .rows import exit_costs
from .stream import early_exit_stream
