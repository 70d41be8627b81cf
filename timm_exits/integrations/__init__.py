"""Training integrations: timm's task API (`MultiExitTask`)."""
from .task import MultiExitTask, MultiExitTrainable

__all__ = ["MultiExitTask", "MultiExitTrainable"]
