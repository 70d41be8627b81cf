"""The wrapped model: its steps and the one loop over them, `MultiExitModel`, and `wrap`."""
from .multi_exit import ExitOutputs, MultiExitModel
from .steps import ExitOutput, ExitRun, ExitStep, StepParts
from .wrap import wrap
