"""Capability benchmarks: lm-evaluation-harness tasks on the model in memory, before and after.

KL divergence on the first response token says how far an edit moves the model on ordinary
prompts, not whether the model still knows things or can still reason. lm-eval, the harness
behind most published figures, measures that with standard tasks (mmlu, gsm8k, hellaswag...),
so heretic runs it rather than benchmarks of its own. It runs on the loaded model: once with a
trial's edit switched on (the run's edit switch, hooks by default; nothing is merged or saved),
and once on the original model. The original's results are cached in OUTPUT_DIR/benchmarks/,
keyed by a fingerprint of the weights, the task (its configuration and the documents scored),
the limit and the lm-eval options, so comparing several trials, or rerunning, runs it once.

Two small tasks ship with heretic (`lm_eval_tasks/`: multiple choice and generation, our own
questions); they run offline in seconds and are what the tests use. `benchmark_task_paths` adds
folders of the user's own task YAMLs (docs/capability.md).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from heretic.errors import HereticError
from heretic.export import write_json

LOCAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
CACHE_FOLDER = "benchmarks"
BOOTSTRAP_ITERS = 1000
FEWSHOT_SEED = 1234  # lm-eval's own default
CPU_BATCH_SIZE = 8
INSTALL_HINT = "install it with `pip install 'lm-eval>=0.4.13'` (scripts/setup.sh does)"


class BenchmarkError(HereticError):
    """A benchmark task cannot be found, loaded or run."""


@dataclass(frozen=True)
class MetricRow:
    """One metric of one task (or group) as lm-eval reports it."""

    task: str
    metric: str  # "acc", or "exact_match (strict-match)" when lm-eval filtered the output
    value: float
    stderr: float | None
    n: int | None  # documents scored
    higher_is_better: bool | None = None


Results = dict[str, list[MetricRow]]
"""Rows per requested task name, in the order lm-eval reports them."""


@dataclass(frozen=True)
class BenchmarkOptions:
    """Everything besides the model and the task that changes what lm-eval measures (and the
    batch sizes, which do not)."""

    limit: int | None = None
    num_fewshot: int | None = None
    chat_template: bool = False
    system_prompt: str | None = None
    batch_size: int = 0
    max_batch_size: int = 64

    @classmethod
    def from_settings(cls, settings) -> BenchmarkOptions:
        return cls(
            limit=settings.benchmark_limit,
            num_fewshot=settings.benchmark_num_fewshot,
            chat_template=settings.benchmark_chat_template,
            system_prompt=settings.system_prompt or None,
            batch_size=settings.benchmark_batch_size,
            max_batch_size=settings.max_batch_size,
        )

    def record(self) -> dict[str, Any]:
        """The options that change results (the system prompt only counts in a chat)."""
        return {
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt if self.chat_template else None,
        }


@dataclass
class Comparison:
    """Original and edited results of the same tasks, with how they were measured."""

    original: Results
    edited: Results
    options: BenchmarkOptions
    lm_eval_version: str
    cached: list[str] = field(default_factory=list)  # tasks whose original results were cached

    def pairs(self) -> Iterator[tuple[MetricRow, MetricRow | None]]:
        for name, rows in self.original.items():
            edited = {(r.task, r.metric): r for r in self.edited.get(name, [])}
            for row in rows:
                yield row, edited.get((row.task, row.metric))


# ----- lm-eval, its tasks and their errors ------------------------------------------------


def lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        import lm_eval  # noqa: F401
    except ImportError as e:
        raise BenchmarkError(f"Benchmarks need lm-evaluation-harness: {INSTALL_HINT}.") from e
    return version("lm_eval")


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval warns about things heretic does on purpose (a model object instead of a name, a
    custom dataset loader); its errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_task_paths(paths: Sequence[Path]) -> list[Path]:
    """`benchmark_task_paths` must be existing folders (lm-eval scans them for YAML files)."""
    if not (LOCAL_TASKS / "heretic_facts.yaml").is_file():
        raise BenchmarkError(
            f"heretic's own benchmark tasks are missing from {LOCAL_TASKS}: reinstall heretic "
            "(pip install -e .)."
        )
    for path in paths:
        if not path.exists():
            raise BenchmarkError(
                f"Benchmark task folder {path} does not exist: fix benchmark_task_paths."
            )
        if not path.is_dir():
            raise BenchmarkError(
                f"benchmark_task_paths entry {path} is a file: give the folder that holds your "
                "task YAML files (lm-eval reads every *.yaml in it)."
            )
    return [path.resolve() for path in paths]


@lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=[str(LOCAL_TASKS), *paths])


def task_manager(paths: Sequence[Path] = ()):
    """lm-eval's index of its own tasks, heretic's and the user's (built once per process: it
    reads thousands of YAML files)."""
    lm_eval_version()
    return _task_manager(tuple(str(p) for p in check_task_paths(paths)))


def check_task_names(names: Sequence[str], manager) -> None:
    """Every name must be a task, group or tag lm-eval knows, each listed once."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BenchmarkError(f"benchmarks lists {', '.join(repeated)} more than once.")
    known = manager.all_tasks
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise BenchmarkError(
            f"Unknown benchmark task {name!r}.{hint} `lm-eval ls tasks` lists lm-eval's tasks; "
            "heretic adds heretic_facts and heretic_words. For a task of your own, put its "
            "YAML in a folder named in benchmark_task_paths (a YAML lm-eval cannot parse is "
            "skipped, so check it parses). Fix benchmarks."
        )


def is_user_or_local(manager, name: str, paths: Sequence[Path]) -> bool:
    """Whether a task's YAML comes from heretic's folder or the user's, not lm-eval's."""
    entry = manager.task_index.get(name)
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None:
        return False
    roots = [LOCAL_TASKS, *(p.resolve() for p in paths)]
    return any(Path(yaml_path).resolve().is_relative_to(root) for root in roots)


def _is_network_error(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, ConnectionError | TimeoutError) or name in (
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "ConnectError",
            "ConnectTimeout",
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_task(manager, name: str) -> dict:
    """lm-eval's {"tasks", "groups", "group_map"} for one requested name (its datasets loaded),
    with each way it fails turned into a message that names the task and what to do."""
    try:
        with quiet_lm_eval():
            return manager.load([name])
    except Exception as e:
        if _is_network_error(e):
            raise BenchmarkError(
                f"Benchmark task {name!r} cannot download its dataset from the Hugging Face "
                f"hub ({e}). Run once where the hub is reachable (datasets are cached after the "
                "first download, and HF_HUB_OFFLINE=1 then reads the cache), or drop it from "
                "benchmarks; heretic_facts and heretic_words run offline."
            ) from e
        if isinstance(e, FileNotFoundError):
            raise BenchmarkError(
                f"Benchmark task {name!r} is missing a file: {e}. Restore it, or fix the task's "
                "YAML (data_files are read relative to local_data.py's folder when the task "
                "uses it, else relative to the current folder)."
            ) from e
        raise BenchmarkError(
            f"Benchmark task {name!r} cannot be loaded: {type(e).__name__}: {e}. Check its "
            "YAML (and dataset), or drop it from benchmarks."
        ) from e


def load_tasks(manager, names: Sequence[str]) -> dict[str, dict]:
    """Each name's tasks; a task reached by two names (a group and one of its tasks) would be
    run twice and reported once, so that is an error."""
    loaded = {name: load_task(manager, name) for name in names}
    owner: dict[str, str] = {}
    for name, result in loaded.items():
        for task in result["tasks"]:
            if task in owner:
                raise BenchmarkError(
                    f"Benchmark task {task!r} is part of both {owner[task]!r} and {name!r}: "
                    "list it once in benchmarks."
                )
            owner[task] = name
    return loaded


def check_benchmarks(settings) -> None:
    """Before the search: the task names (and folders) are known, and the tasks that are read
    from local files, or from the datasets cache under HF_HUB_OFFLINE=1, load. Hub tasks are
    otherwise downloaded when they first run."""
    if not settings.benchmarks:
        return
    paths = list(settings.benchmark_task_paths)
    manager = task_manager(paths)
    check_task_names(settings.benchmarks, manager)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    early = [n for n in settings.benchmarks if offline or is_user_or_local(manager, n, paths)]
    load_tasks(manager, early)


# ----- running ---------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def result_rows(name: str, loaded: Mapping[str, Any], output: Mapping[str, Any]) -> list[MetricRow]:
    """The rows of one requested name: its own aggregate when lm-eval made one (a task, a
    group with an aggregate such as mmlu), else one set per task (a tag such as ai2_arc)."""
    results = output["results"]
    own = _metric_rows(name, results.get(name, {}), output, loaded)
    if own:
        return own
    rows: list[MetricRow] = []
    for task in loaded["tasks"]:
        rows += _metric_rows(task, results.get(task, {}), output, {"tasks": {task: None}})
    return rows


def _metric_rows(
    task: str, values: Mapping[str, Any], output: Mapping[str, Any], loaded: Mapping[str, Any]
) -> list[MetricRow]:
    samples = output.get("n-samples", {})
    counts = [samples.get(t, {}).get("effective") for t in loaded["tasks"]]
    n = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
    better = output.get("higher_is_better", {}).get(task, {})
    rows = []
    for key, value in values.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or _float(value) is None:
            continue
        label = metric if filter_name == "none" else f"{metric} ({filter_name})"
        stderr = _float(values.get(f"{metric}_stderr,{filter_name}"))
        rows.append(MetricRow(task, label, float(value), stderr, n, better.get(metric)))
    return rows


def _merged(loaded: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    merged: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    for one in loaded:
        for key in merged:
            merged[key].update(one.get(key) or {})
    return merged


def _prepare(task_dict: Mapping[str, Any], options: BenchmarkOptions) -> None:
    """What lm-eval's simple_evaluate does to tasks before it scores them (few-shot count and
    seed), without its side effects (global seeds, an environment report)."""
    for task in task_dict["tasks"].values():
        default = task.get_config("num_fewshot")
        if options.num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=options.num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)


def evaluate(model, tokenizer, task_dict: Mapping[str, Any], options: BenchmarkOptions) -> dict:
    """lm-eval's raw output for `task_dict` on the model as it is now (edit on or off)."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    batch_size: int | str = options.batch_size or (
        CPU_BATCH_SIZE if device.type == "cpu" else "auto"
    )
    _prepare(task_dict, options)
    try:
        with quiet_lm_eval():
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                backend="causal",
                batch_size=batch_size,
                max_batch_size=options.max_batch_size,
            )
            return lm_evaluate(
                lm=lm,
                task_dict=task_dict,
                limit=options.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
                system_instruction=options.system_prompt if options.chat_template else None,
                apply_chat_template=options.chat_template,
                fewshot_as_multiturn=options.chat_template,
            )
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # lm-eval's automatic batch size gives up with a RuntimeError when even 1 does not fit
        # at the model's full context length (it sizes generation for that length).
        if not isinstance(e, torch.OutOfMemoryError) and "executable batch size" not in str(e):
            raise
        raise BenchmarkError(
            f"Out of memory while benchmarking at batch size {batch_size} ({e}): set "
            "benchmark_batch_size to a small number (or lower benchmark_limit / few-shot "
            "examples)."
        ) from e


# ----- the original's cache --------------------------------------------------------------


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the weights as loaded: every tensor's name, shape, dtype and first and last
    values. Two checkpoints, or two dtypes, of a model differ in it; reading all the weights
    would cost seconds per GB for nothing more."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        if param.device.type == "meta" or param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:32], flat[-32:]]).float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _stable(value: Any) -> str:
    """JSON for hashing: objects lm-eval keeps in a config are named by type, never by their
    address, so the same task hashes the same in every process."""
    return json.dumps(value, sort_keys=True, default=lambda o: type(o).__name__)


def tasks_digest(loaded: Mapping[str, Any], limit: int | None) -> str:
    """The configuration and the scored documents of every task under one requested name, so
    an edited task file, or a changed dataset, never reuses an old original result."""
    digest = hashlib.sha256()
    for name in sorted(loaded["tasks"]):
        task = loaded["tasks"][name]
        digest.update(name.encode())
        digest.update(_stable(task.dump_config()).encode())
        docs = task.eval_docs
        count = len(docs) if limit is None else min(limit, len(docs))
        for i in range(count):
            digest.update(_stable(docs[i]).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, name: str, key: Mapping[str, Any]) -> Path:
    code = hashlib.sha256(_stable(key).encode()).hexdigest()[:16]
    return cache_dir / f"original-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{code}.json"


def read_cached(path: Path) -> list[MetricRow] | None:
    """Rows stored by `write_cached`; None when there are none (or the file is damaged, which
    only costs running the original again)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return [MetricRow(**row) for row in stored["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path, key: Mapping[str, Any], rows: Sequence[MetricRow]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json({"key": dict(key), "rows": [asdict(r) for r in rows]}, path)


# ----- before and after ------------------------------------------------------------------


class Benchmarks:
    """The configured tasks, run on one loaded model before and after an edit.

    `model` is heretic's Model; `switch_on` / `switch_off` turn the trial's edit on and off
    (the run's edit switch: hooks, or weights merged in place and restored).
    """

    def __init__(
        self,
        names: Sequence[str],
        options: BenchmarkOptions,
        task_paths: Sequence[Path] = (),
        cache_dir: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if not names:
            raise BenchmarkError(
                'No benchmark tasks: set benchmarks (e.g. benchmarks = ["mmlu", "gsm8k"], or '
                '["heretic_facts"] offline).'
            )
        self.names = list(names)
        self.options = options
        self.manager = task_manager(task_paths)
        check_task_names(self.names, self.manager)
        self.cache_dir = cache_dir
        self.log = log

    def compare(
        self, model, switch_on: Callable[[], None], switch_off: Callable[[], None]
    ) -> Comparison:
        """Original (cached) and edited results of one loaded model. The loaded tasks serve
        both passes: lm-eval builds a task's requests afresh in every pass (checked: a second
        pass on the same task objects gives what freshly loaded ones give)."""
        loaded = self.load()
        switch_off()
        original, cached = self.original(model, loaded)
        switch_on()
        try:
            edited = self.edited(model, loaded)
        finally:
            switch_off()
        return self.comparison(original, edited, cached)

    def load(self) -> dict[str, dict]:
        """The configured tasks, loaded once for every pass."""
        return load_tasks(self.manager, self.names)

    def original(self, model, loaded: Mapping[str, Mapping[str, Any]]) -> tuple[Results, list[str]]:
        """The original model's results, and the tasks read from the cache."""
        return self._original(model, loaded, lm_eval_version())

    def edited(self, model, loaded: Mapping[str, Mapping[str, Any]]) -> Results:
        """The edited model's results (never cached: an edit is one trial's)."""
        self.log(f"edited model: running {', '.join(self.names)}")
        return self._run(model, loaded)

    def comparison(self, original: Results, edited: Results, cached: list[str]) -> Comparison:
        return Comparison(original, edited, self.options, lm_eval_version(), cached)

    def _original(
        self, model, loaded: Mapping[str, Mapping[str, Any]], version: str
    ) -> tuple[Results, list[str]]:
        """The original model's results (edit off), from the cache where they are there."""
        fingerprint = model_fingerprint(model.model)
        found: Results = {}
        missing: dict[str, tuple[dict, Path | None]] = {}
        for name in self.names:
            key = {
                "model": fingerprint,
                "task": name,
                "tasks": tasks_digest(loaded[name], self.options.limit),
                "lm_eval": version,
                **self.options.record(),
            }
            path = cache_path(self.cache_dir, name, key) if self.cache_dir else None
            rows = read_cached(path) if path is not None else None
            if rows is None:
                missing[name] = (key, path)
            else:
                found[name] = rows
        cached = [n for n in self.names if n in found]
        if cached:
            self.log(f"original model: cached results of {', '.join(cached)}")
        if missing:
            self.log(f"original model: running {', '.join(missing)}")
            ran = self._run(model, {n: loaded[n] for n in missing})
            for name, (key, path) in missing.items():
                found[name] = ran[name]
                if path is not None:
                    write_cached(path, key, ran[name])
        return {name: found[name] for name in self.names}, cached

    def _run(self, model, loaded: Mapping[str, Mapping[str, Any]]) -> Results:
        output = evaluate(
            model.runner, model.tokenizer, _merged(list(loaded.values())), self.options
        )
        if output is None:
            raise BenchmarkError("lm-eval returned no results (a multi-process launch?).")
        results = {name: result_rows(name, one, output) for name, one in loaded.items()}
        empty = [name for name, rows in results.items() if not rows]
        if empty:
            raise BenchmarkError(
                f"lm-eval reported no metric for {', '.join(empty)}: check the task's "
                "metric_list (a task without metrics cannot be compared)."
            )
        return results
