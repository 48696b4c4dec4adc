"""Layer reuse: the config (`config.py`), the decoder's per-step view of it (`schedule.py`) and the
policies that decide when a layer computes (`policies/`, one file each, registered by name)."""

from .config import REUSE_FIELDS, LayerReuseConfig, no_reuse, reuse_label
from .policies import ReusePolicy, StepCountPolicy, register_policy, unregister_policy
from .schedule import ReuseSchedule, RowStep, StepActions

__all__ = ["REUSE_FIELDS", "LayerReuseConfig", "ReusePolicy", "ReuseSchedule", "RowStep", "StepActions",
           "StepCountPolicy", "no_reuse", "register_policy", "reuse_label", "unregister_policy"]
