"""A k × subset (× size × mode) sweep that can be stopped and restarted at any point.

Each cell is an ordinary run with its own folder; a cell whose summary.json already covers the
rows asked for is skipped (unless forced), a partly done cell resumes from its samples, a larger
--limit extends finished cells, and the model is loaded once for all cells. Once the model is
loaded, every cell's reuse settings are checked against it before the first cell decodes.
Finished cells are never touched again, so killing the sweep loses at most the batch in flight.
"""

from __future__ import annotations

import itertools
import logging
import os
import traceback
from dataclasses import dataclass, field

from .data import DataUnavailableError
from .folder_lock import RunFolderBusyError
from .model_calls import ModelUnavailableError, check_layer_reuse, load_model_and_tokenizer
from .options import EvalOptions, InvalidOptionError
from .runner import completed_summary, run_eval

logger = logging.getLogger(__name__)

# Errors that every cell would hit the same way: stop instead of failing each cell in turn. A folder
# another process holds means another sweep is running over the same cells: stop, do not race it.
FATAL = (DataUnavailableError, ModelUnavailableError, InvalidOptionError, RunFolderBusyError)


@dataclass
class GridOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)


def grid_options(base: EvalOptions, ks, subsets, sizes=None, modes=None, *, tolerances=None,
                 layer_ks=None) -> list[EvalOptions]:
    """Every combination, k outermost, then the unmask_drift policy at each tolerance and the
    per_layer policy with each schedule; each cell validated before anything runs."""
    cells = []
    for k, subset, size, mode in itertools.product(ks, subsets, sizes or [base.size], modes or [base.mode]):
        if k == 1 and any(c.k == 1 for c in cells):
            continue  # k=1 is no reuse: subset, size and mode change nothing, so it runs once
        cells.append(base.replace(k=k, subset=subset, size=size, mode=mode).validate())
    for tolerance, subset, size, mode in itertools.product(tolerances or [], subsets, sizes or [base.size],
                                                           modes or [base.mode]):
        cells.append(base.replace(k=1, subset=subset, size=size, mode=mode, policy="unmask_drift",
                                  tolerance=tolerance).validate())
    for layer_k, subset, size, mode in itertools.product(layer_ks or [], subsets, sizes or [base.size],
                                                         modes or [base.mode]):
        cells.append(base.replace(k=1, subset=subset, size=size, mode=mode, policy="per_layer",
                                  layer_k=list(layer_k)).validate())
    names = [c.config_name() for c in cells]
    if len(set(names)) != len(names):
        raise InvalidOptionError("the grid has repeated configurations (k/subset/size/mode lists repeat a value)")
    return cells


def run_grid(
    cells: list[EvalOptions],
    *,
    max_runs: int | None = None,
    loader=load_model_and_tokenizer,
    context=None,
    scorer=None,
    say=print,
) -> GridOutcome:
    """Run the cells that have no summary yet; `max_runs` stops after that many cells ran."""
    outcome = GridOutcome()
    cache: dict = {}

    def load_once(options, device):
        if "model" not in cache:
            model, tokenizer = loader(options, device)
            for cell in cells:  # a depth the model lacks fails now, not after earlier cells ran
                check_layer_reuse(cell, model.config.num_hidden_layers)
            cache["model"] = (model, tokenizer)
        return cache["model"]

    for number, options in enumerate(cells, 1):
        name = f"{options.task}/{options.config_name()}"
        if completed_summary(options) is not None:
            say(f"[grid] {number}/{len(cells)} skip {name} (summary exists: {os.path.join(options.run_dir(), 'summary.json')})")
            outcome.skipped.append(name)
            continue
        if max_runs is not None and len(outcome.ran) + len(outcome.failed) >= max_runs:
            outcome.pending.append(name)
            continue
        say(f"[grid] {number}/{len(cells)} run {name}")
        try:
            model, tokenizer = cache.get("model", (None, None))
            run_eval(options, model=model, tokenizer=tokenizer, loader=load_once, context=context, scorer=scorer)
        except FATAL:
            raise
        except Exception:  # one bad cell (e.g. out of memory) must not stop the rest of the sweep
            if context is not None and context.world_size > 1:
                raise
            say(f"[grid] {number}/{len(cells)} FAILED {name}:\n{traceback.format_exc()}")
            outcome.failed.append(name)
            continue
        outcome.ran.append(name)
    say(
        f"[grid] finished: ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, "
        f"failed {len(outcome.failed)}, not started {len(outcome.pending)}"
    )
    return outcome
