"""The run loop: rows → prompts → model call → scores → per-batch records → summary.json.

Order matters and is the point of this module:
1. validate options, read and check the data, look at what earlier (interrupted) runs
   finished — all before any model is loaded, so bad input and "nothing left to do" cost nothing;
2. split the unfinished rows across processes, load the model, check that the run's settings
   fit it, warm it up on a few rows (not counted);
3. only then does the folder change: run.json is written (and, with --force, earlier results
   are set aside until the first new result exists); samples + counters are appended after
   every batch;
4. the main process merges every process's records and writes the summary once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time

import torch

from ..reuse.config import REUSE_FIELDS
from . import artifacts
from .artifacts import RunFiles
from .data import LETTERS, DataUnavailableError, Example, load_task_data
from .distributed import ProcessContext, process_context
from .folder_lock import run_folder_lock
from .model_calls import (
    build_generation_config,
    check_device,
    check_model_fits,
    generate_batch,
    load_model_and_tokenizer,
    loglikelihood_batch,
    model_device,
    reuse_config,
)
from .options import EvalOptions, InvalidOptionError
from .prompts import build_prompt, continuations, encode_pair, render_text
from .protocols import LM_EVAL_TASK, OWN_TASKS, Protocol, reference_budget, settings_for
from .provenance import environment, machine_load
from .summary_stats import group_metrics, metric_stderrs
from .throughput import summarize_throughput

logger = logging.getLogger(__name__)


class MetricsScorer:
    """Adapter over `dllm_generation.eval.metrics` (imported on first use)."""

    def __init__(self, module=None):
        self._module = module

    @property
    def module(self):
        if self._module is None:
            from . import metrics

            self._module = metrics
        return self._module

    def score(self, task: str, text: str, doc: dict) -> dict:
        return self.module.score_sample(task, text, doc)

    def aggregate(self, task: str, metrics: list[dict]) -> dict:
        return self.module.aggregate(task, metrics)

    def primary(self, task: str) -> str:
        return self.module.PRIMARY_METRIC[task]


def metrics_task(options: EvalOptions) -> str:
    """Name of the task in the metrics package (MMLU's generative mode has its own scorer)."""
    return "mmlu_generative" if options.task == "mmlu" else options.task


def follows_reference(options: EvalOptions) -> bool:
    """fork/paper runs batch, budget and order rows as the reference model class does; this
    project's own tasks (arith) have no reference, so they decode with their plain budget."""
    return options.protocol != Protocol.CUSTOM.value and options.task not in OWN_TASKS


def run_eval(
    options: EvalOptions,
    *,
    model=None,
    tokenizer=None,
    context: ProcessContext | None = None,
    scorer: MetricsScorer | None = None,
    loader=load_model_and_tokenizer,
    progress: bool = True,
) -> dict:
    """Evaluate `options` (resuming a partial run) and return the summary dict.

    `model`/`tokenizer` let a grid load once; otherwise `loader(options, device)` is called,
    and only if some row is still unfinished.
    """
    started = time.perf_counter()
    options = options.validate()
    check_device(options)
    ctx = context or process_context()
    scorer = scorer or MetricsScorer()
    if options.uses_loglikelihood and reuse_config(options) is not None and ctx.is_main:
        logger.warning("%s: layer reuse does not apply to loglikelihood scoring (one forward per choice); "
                       "use --mmlu-mode generative to measure it", options.layer_reuse().label)
    files = RunFiles(options.run_dir(), ctx.rank)
    # The main process holds the folder for the whole run: nothing below may interleave with another run.
    with run_folder_lock(files.dir) if ctx.is_main else contextlib.nullcontext():
        return _run_locked(options, files, ctx, scorer, model=model, tokenizer=tokenizer, loader=loader,
                           progress=progress, started=started)


def _run_locked(options, files: RunFiles, ctx, scorer, *, model, tokenizer, loader, progress, started) -> dict:
    if ctx.is_main:
        files.settle_replaced()
    ctx.barrier()
    identity = options.identity()
    conflicts = [] if options.force else files.identity_conflicts(identity)
    if conflicts:
        raise InvalidOptionError(
            f"{files.dir} holds results made with other settings ({'; '.join(conflicts)}); "
            "pass --force to replace them, or pick another --output-dir / --run-name"
        )

    data = load_task_data(options)
    summary = None if options.force else files.read_summary()
    if summary is not None and summary.get("dataset", {}).get("count") == len(data.examples):
        have = {r["id"] for r in files.finished_samples()}
        missing = [ex.id for ex in data.examples if ex.id not in have]
        if not missing:
            if ctx.is_main:
                logger.info("summary exists, nothing to do: %s (use --force to recompute)", files.summary)
            return summary
        if ctx.is_main:
            logger.warning("%s: the summary covers %d rows but %d have no readable sample (first: %s); "
                           "decoding them again", files.dir, len(data.examples), len(missing), missing[0])

    if ctx.is_main and not options.force:
        files.repair()
    ctx.barrier()
    finished = set() if options.force else {r["id"] for r in files.finished_samples()}
    ctx.barrier()  # every process has read the finished ids before any appends
    todo = [ex for ex in data.examples if ex.id not in finished]
    mine = ctx.split(todo)
    if ctx.is_main and finished:
        logger.info("resuming %s: %d of %d rows already finished", files.dir, len(data.examples) - len(todo), len(data.examples))

    _seed_everything(options.seed)
    device = options.device
    warmup = None
    evaluator = None
    load = machine_load(sample=True)
    if mine:
        if model is None:
            device = _choose_device(options, ctx)
            model, tokenizer = loader(options, device)
        check_model_fits(options, model, tokenizer)
        device = str(model_device(model))
        evaluator = _Evaluator(options, model, tokenizer, data, scorer, ctx.rank)
        evaluator.check_rows(mine)
        if options.warmup:
            warmup = evaluator.warm_up(mine)
    ctx.barrier()  # every process can start: only now does the folder change
    if ctx.is_main:
        files.begin(identity, replace=options.force)
    ctx.barrier()
    try:
        if evaluator is not None:
            evaluator.run(mine, files, progress=progress and ctx.is_main)
    except BaseException:
        if ctx.is_main:  # a --force run that wrote nothing yet gives the folder back as it was
            files.settle_replaced()
        raise
    ctx.barrier()

    if ctx.is_main:
        summary = _finalize(options, data, files, scorer, model, device or _choose_device(options, ctx), warmup,
                            load_before=load, started=started)
    ctx.barrier()
    if not ctx.is_main:
        summary = artifacts.read_json(files.summary)  # the main process has just written it
    return summary


def completed_summary(options: EvalOptions) -> dict | None:
    """The folder's summary if it already covers the rows `options` asks for, under the same settings.

    Decided from the folder alone (no data is read): the summary records how many rows its data
    source has and how many it covers, so a larger --limit than the finished one is not complete.
    """
    files = RunFiles(options.run_dir())
    if options.force or not files.has_summary() or files.identity_conflicts(options.identity()):
        return None
    summary = files.read_summary()
    if summary is None:
        return None
    dataset = summary.get("dataset", {})
    total, count = dataset.get("total"), dataset.get("count")
    if total is None or count is None:
        return None
    wanted = total if options.limit is None else min(options.limit, total)
    return summary if count == wanted else None


# ---------------------------------------------------------------------------- evaluating rows
class _Evaluator:
    """Turns a list of rows into sample records, one batch at a time."""

    def __init__(self, options, model, tokenizer, data, scorer, rank):
        self.options, self.model, self.tokenizer = options, model, tokenizer
        self.data, self.scorer, self.rank = data, scorer, rank
        self.index = {ex.id: i for i, ex in enumerate(data.examples)}
        self.generation_config = None if options.uses_loglikelihood else build_generation_config(options, tokenizer)
        self._ids: dict = {}  # prompt ids per row id, tokenised once

    def _prompt_text(self, ex: Example) -> str:
        prompt = build_prompt(self.options.task, ex.doc, self.data.fewshot, mmlu_mode=self.options.mmlu_mode)
        return render_text(self.tokenizer, prompt, chat_template=self.options.chat_template)

    def _prompt_ids(self, ex: Example) -> list[int]:
        if ex.id not in self._ids:
            self._ids[ex.id] = self.tokenizer(self._prompt_text(ex))["input_ids"]
        return self._ids[ex.id]

    def check_rows(self, rows: list[Example]) -> None:
        """Rows the model cannot decode are refused before the first batch and before the folder
        changes, naming the row: a prompt that holds the mask token (the decoder would write over
        it; a text containing the tokenizer's `|<MASK>|` encodes to it) or one too long for the
        model's positions at this token budget. Loglikelihood prompts are scored, never decoded."""
        if self.options.uses_loglikelihood:
            return
        from dllm_generation.config import mask_token_id_of
        from dllm_generation.decoding import plan_layout

        mask = mask_token_id_of(self.generation_config, self.model.generation_config, self.model.config)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        bs = self.options.block_size
        for ex in rows:
            ids = self._prompt_ids(ex)
            if mask is not None and mask in ids:
                token = self.tokenizer.convert_ids_to_tokens(mask)
                fields = [k for k, v in ex.doc.items() if isinstance(v, str) and token in v] or ["prompt"]
                raise DataUnavailableError(
                    f"row {ex.id!r}: field {fields[0]!r} holds the mask token {token!r} (id {mask}), which the "
                    "decoder would write over (allowed: text without it); remove that row or the string from the data"
                )
            budget = self._budgets([ids])[0] if follows_reference(self.options) else self.options.max_new_tokens
            if max_pos is not None and plan_layout([len(ids)], bs, budget).last_position(0, bs) >= max_pos:
                raise DataUnavailableError(
                    f"row {ex.id!r}: its prompt has {len(ids)} tokens; with max_new_tokens={self.options.max_new_tokens} "
                    f"it needs positions beyond the model's max_position_embeddings={max_pos} (allowed: a shorter "
                    "row, or a smaller --max-new-tokens); shorten or remove that row"
                )

    def _budgets(self, prompts: list[list[int]]) -> list[int] | None:
        """The reference's per-row budgets (block-aligned on the batch's longest prompt), or None (custom)."""
        if not follows_reference(self.options):
            return None
        longest = max(len(p) for p in prompts)
        return [reference_budget(longest, self.options.max_new_tokens, self.options.block_size) + longest - len(p)
                for p in prompts]

    def warm_up(self, rows: list[Example]) -> dict:
        """One batch through the same code path before the timed ones, its time and counters
        discarded. A generation warm-up decodes the run's longest prompts at its batch size and
        token budget: the fast path sizes its static buffers (rows x capacity) and compiles its
        layer functions there, so no timed batch grows them, which would capture and compile again."""
        start = time.perf_counter()
        if self.options.uses_loglikelihood:
            warmed = rows[:1]
            self._loglikelihood(warmed)
            extra = {}
        else:
            warmed = sorted((self._prompt_ids(ex) for ex in rows), key=len)[-self.options.batch_size:]
            budgets = self._budgets(warmed)
            generate_batch(self.model, self.tokenizer, warmed, self.generation_config, budgets)
            extra = {"max_new_tokens": max(budgets) if budgets else self.generation_config.max_new_tokens}
        return {"batches": 1, "prompts": len(warmed), **extra, "seconds": round(time.perf_counter() - start, 4),
                "counted": False}

    def run(self, rows: list[Example], files: RunFiles, *, progress: bool) -> None:
        from tqdm.auto import tqdm

        size = self.options.batch_size
        if follows_reference(self.options) and not self.options.uses_loglikelihood:
            # The reference sorts its requests by prompt length (characters) before batching.
            rows = sorted(rows, key=lambda ex: len(self._prompt_text(ex)))
        # A context manager, so an error or Ctrl-C closes the bar and its message starts a clean line.
        with tqdm(total=len(rows), desc=f"{self.options.task}/{self.options.config_name()}", unit="prompt",
                  disable=not progress) as bar:
            for start in range(0, len(rows), size):
                batch = rows[start : start + size]
                began = time.perf_counter()
                if self.options.uses_loglikelihood:
                    records, stats = self._loglikelihood(batch)
                else:
                    records, stats = self._generate(batch)
                stats.update(rank=self.rank, size=len(batch), first_id=batch[0].id, ids=[ex.id for ex in batch],
                             loop_seconds=time.perf_counter() - began - stats.pop("scoring_seconds", 0.0))
                files.append(records, stats)
                bar.update(len(batch))
                if stats.get("wall_seconds"):
                    bar.set_postfix(tok_s=f"{stats['tokens'] / stats['wall_seconds']:.1f}")

    def _generate(self, batch: list[Example]):
        prompts = [self._prompt_ids(ex) for ex in batch]
        result = generate_batch(self.model, self.tokenizer, prompts, self.generation_config, self._budgets(prompts))
        task = metrics_task(self.options)
        records = []
        scoring_started = time.perf_counter()
        for ex, ids, text, count in zip(batch, prompts, result.texts, result.token_counts):
            scored = self.scorer.score(task, text, ex.doc)
            records.append(
                {
                    "id": ex.id,
                    "index": self.index[ex.id],
                    "prediction": text,
                    "extracted": scored.get("extracted"),
                    "gold": scored.get("gold"),
                    "correct": bool(scored.get("correct")),
                    "metrics": scored.get("metrics", {}),
                    "prompt_tokens": len(ids),
                    "generated_tokens": count,
                }
            )
        stats = dict(result.stats, scoring_seconds=time.perf_counter() - scoring_started)
        return records, stats

    def _loglikelihood(self, batch: list[Example]):
        """MMLU / GPQA: the choice with the highest loglikelihood is the prediction (lm-eval's `acc`:
        the first of equal maxima). Requests are built as lm-eval builds them; each (context,
        choice) pair is tokenised as the reference model class does."""
        choices = continuations(self.options.task, self.options.chat_template)
        contexts, conts, prompts = [], [], []
        for ex in batch:
            text = self._prompt_text(ex)
            for choice in choices:
                context_ids, cont_ids = encode_pair(self.tokenizer, text, choice)
                contexts.append(context_ids)
                conts.append(cont_ids)
            prompts.append(contexts[-1])
        lls, stats = loglikelihood_batch(self.model, contexts, conts, self.options.batch_size,
                                         forward=self.options.loglikelihood_forward,
                                         eos_token_id=self.tokenizer.eos_token_id, block_size=self.options.block_size)
        records = []
        for row, (ex, ids) in enumerate(zip(batch, prompts)):
            scores = lls[row * len(choices) : (row + 1) * len(choices)]
            choice = max(range(len(scores)), key=scores.__getitem__)
            correct = choice == ex.doc["answer"]
            records.append(
                {
                    "id": ex.id,
                    "index": self.index[ex.id],
                    "prediction": LETTERS[choice],
                    "extracted": LETTERS[choice],
                    "gold": ex.doc["answer_letter"],
                    "correct": correct,
                    "metrics": {"accuracy": float(correct)},
                    "loglikelihoods": scores,
                    "prompt_tokens": len(ids),
                }
            )
        return records, stats


# ---------------------------------------------------------------------------- summary
def _finalize(options, data, files: RunFiles, scorer, model, device, warmup, *, started: float,
              load_before=None) -> dict:
    wanted = {ex.id for ex in data.examples}
    finished = sorted(files.finished_samples(), key=lambda r: r["index"])
    samples = [r for r in finished if r["id"] in wanted]
    if len(samples) != len(wanted):
        raise RuntimeError(
            f"{files.dir}: {len(wanted) - len(samples)} rows have no sample record after the run; rerun to finish them"
        )
    all_batches = files.batch_records()
    # Every finished row stays on disk (a smaller --limit reports fewer rows but deletes none);
    # the summary covers the requested rows and the batches made only of them.
    files.consolidate(finished, all_batches)
    batches = [b for b in all_batches if "ids" not in b or wanted.issuperset(b["ids"])]

    metric_dicts = [s["metrics"] for s in samples]
    if options.uses_loglikelihood:
        names = ["accuracy"]
        metrics = {"accuracy": sum(m["accuracy"] for m in metric_dicts) / max(len(metric_dicts), 1)}
        primary = "accuracy"
    else:
        names = list(scorer.module.METRIC_NAMES[metrics_task(options)])
        metrics = scorer.aggregate(metrics_task(options), metric_dicts)
        primary = scorer.primary(metrics_task(options))
    metrics.update(metric_stderrs(metric_dicts, names))
    groups = _groups(options, samples, data, primary)
    if options.task == "mmlu":
        metrics["accuracy_by_subject"] = {name: g["score"] for name, g in groups["subjects"].items()}
    token_kind = "scored (context + continuation)" if options.uses_loglikelihood else "generated (non-pad)"
    env = environment(device, load_before=load_before)
    throughput = summarize_throughput(batches, token_kind=token_kind, warmup=warmup)
    throughput["end_to_end_seconds"] = round(time.perf_counter() - started, 6)
    throughput["end_to_end_timing"] = ("main process, from the start of run_eval to the summary (data, model load, "
                                       "warm-up, decoding, scoring, files); this invocation only, not earlier "
                                       "resumed parts")
    summary = {
        "task": options.task,
        "protocol": {"name": options.protocol, "settings": settings_for(options.protocol, options.task).as_dict(),
                     "source": settings_for(options.protocol, options.task).source,
                     "overrides": options.overrides()},
        "config": options.config_name(),
        "primary_metric": primary,
        "accuracy": metrics.get(primary),
        "accuracy_stderr": metrics.get(f"{primary}_stderr"),
        "metrics": metrics,
        "groups": groups,
        # By the primary metric (what `accuracy` averages), also for samples written before `correct` followed it.
        "counts": {"samples": len(samples),
                   "correct": sum(1 for s in samples if float(s["metrics"].get(primary, s["correct"])) == 1.0)},
        "throughput": throughput,
        "model": _model_info(options, model, device),
        "generation": _generation_info(options, model, batches),
        "prompting": {
            "chat_template": options.chat_template,
            "fewshot_as_multiturn": True,
            "num_fewshot": options.fewshot,
            "lm_eval_task": LM_EVAL_TASK[options.task],
            "mmlu_mode": options.mmlu_mode if options.task == "mmlu" else None,
        },
        "dataset": data.source,
        "seed": options.seed,
        "environment": env,
        "timestamp": env["timestamp"],
        "options": options.to_dict(),
    }
    artifacts.write_json_atomic(files.summary, summary)
    logger.info("%s/%s: %s=%s over %d rows -> %s", options.task, summary["config"], primary,
                summary["accuracy"], len(samples), files.summary)
    return summary


def _groups(options, samples: list[dict], data, primary: str) -> dict:
    """Per-subject scores and lm-eval's groups above them (MMLU categories, MATH subjects); {} otherwise."""
    if options.task == "mmlu":
        key = "subject"
    elif options.task in ("math", "minerva_math"):
        key = None
    else:
        return {}
    from .data import math_subject

    subject_of = {ex.id: (ex.doc[key] if key else math_subject(ex.doc)) for ex in data.examples}
    values: dict[str, list[float]] = {}
    for s in samples:
        values.setdefault(subject_of[s["id"]], []).append(float(s["metrics"][primary]))
    return group_metrics(options.task, values)


def _model_info(options, model, device) -> dict:
    info = {"path": options.model, "tokenizer": options.tokenizer, "dtype": options.dtype, "device": str(device)}
    if model is not None:
        info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        info["num_hidden_layers"] = getattr(model.config, "num_hidden_layers", None)
        info["class"] = type(model).__name__
        info["mask_token_id"] = getattr(model.generation_config, "mask_token_id", None)
    return info


def _generation_info(options, model, batches: list[dict]) -> dict:
    reuse = None
    if reuse_config(options) is not None:
        reuse = {name: getattr(options, name) for name in REUSE_FIELDS}
        if model is not None:
            reuse["resolved_layers"] = list(reuse_config(options).resolve_layers(model.config.num_hidden_layers))
    return {
        "decoding": "loglikelihood (one masked forward per choice)" if options.uses_loglikelihood else "block diffusion",
        "k": options.k,
        "layer_reuse": reuse,
        "max_new_tokens": options.max_new_tokens,
        "block_size": options.block_size,
        "small_block_size": options.small_block_size,
        "threshold": options.threshold,
        "use_block_cache": options.use_block_cache,
        "fast_path": fast_path_ran(batches),
        "fast_path_requested": options.fast_path,
        "loglikelihood_forward": options.loglikelihood_forward if options.uses_loglikelihood else None,
        "do_sample": False,
        "batch_size": options.batch_size,
    }


# ---------------------------------------------------------------------------- helpers
def _choose_device(options, ctx: ProcessContext) -> str:
    if ctx.world_size > 1 and ctx.device and options.device in (None, "cuda"):
        return ctx.device
    if options.device:
        return options.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def fast_path_ran(batches: list[dict]) -> str | None:
    """What decoded the counted batches: the fast-path mode(s) generate reported, not the setting.

    None when no batch was decoded by `generate` (MMLU loglikelihood scoring has no fast path).
    """
    ran = sorted({b["fast_path"] for b in batches if b.get("fast_path")})
    if not ran:
        return None
    return ran[0] if len(ran) == 1 else "mixed: " + "; ".join(ran)
