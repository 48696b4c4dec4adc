"""What every training command of this library records: a time limit, the loss curve, the versions."""

from __future__ import annotations

import logging
import platform
import sys
import time

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class TimeLimit(TrainerCallback):
    """Save a checkpoint and stop once the wall-clock deadline has passed."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline:
            control.should_save = True
            control.should_training_stop = True
        return control


def versions() -> dict:
    """Python, torch, transformers (and peft, when installed), the GPU and the command line."""
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        pass
    found["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    found["command"] = " ".join(sys.argv)
    return found


def plot_loss(history: list[dict], path: str, *, title: str, ylabel: str = "training loss") -> None:
    """The loss curve as a PNG (skipped, with a warning, when matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no loss curve written to %s", path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([e["step"] for e in history], [e["loss"] for e in history])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
