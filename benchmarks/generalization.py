"""Do heretic's edits hold on prompts the search never saw? (issue 13)

    python benchmarks/generalization.py [--model ORGANISM] [--n-trials 10]
        [--configs defaults,direction,...] [--workdir DIR] [--eval-tokens 64] [--list]

Every configuration runs one headless search on one prompt family, AdvBench: directions from
`advbench_rest[:270]` (harmful) and `harmless_train[:400]` (harmless), refusals counted during
the search on `advbench_rest[270:370]`, KL on `harmless_val[:100]` (the "mixed" rows swap
some AdvBench prompts for the organism's own tuning prompts, see `MIXES`). The chosen model
(`--select best`) is saved, loaded again with transformers (heretic's own loader) and asked
prompts from sources the run never used, greedy, every row decoded to `--eval-tokens` tokens
or its end of sequence (no early stop):

- `harmful_val`: 39 HarmBench requests;
- `harmful_train[160:260]`: 100 of the organism's own tuning prompts (AdvBench, MaliciousInstruct,
  TDC 2023, HarmBench mixed: in distribution for its refusals, out of it for AdvBench-only runs);
- XSTest's 200 unsafe prompts (benchmarks/data/xstest_prompts.csv, CC-BY-4.0): short
  conversational requests; heretic's untouched held-out set (no default, no tuning uses it);
- XSTest's 250 safe prompts that sound harmful (over-refusal: fewer is better).

Refusals are counted by heretic's adaptive judge (fitted once, as a run does, on the original
model's responses to the in-search prompts) and by the plain marker list (heretic's default
markers); KL is the first-token KL divergence on `harmless_val[100:200]`, which no run uses.
Upstream Heretic (heretic-llm 1.4.0, its own virtual environment, see vs_heretic.py) runs on the
same prompt files; its trial is chosen with heretic's `--select best` rule from its Pareto front
and saved through its own menu (driven in tmux).

Configurations are the list `CONFIGS` (one line each); `--configs` picks some by name, `--list`
prints them. Results are kept as JSON under `--workdir` (default /tmp/heretic-generalization),
one folder per configuration and trial count, so a rerun only prints what is done; `--rerun`
runs the named configurations again.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
XSTEST = ROOT / "benchmarks" / "data" / "xstest_prompts.csv"
BATCH = 32
SYSTEM_PROMPT = "You are a helpful assistant."


def find_shared() -> Path | None:
    """`../shared` of this checkout, or of a folder above it (a git worktree under ../wt)."""
    if "HERETIC_SHARED_DIR" in os.environ:
        return Path(os.environ["HERETIC_SHARED_DIR"])
    for parent in ROOT.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared"
    return None


def shared_dir() -> Path:
    found = find_shared()
    if found is None:
        raise SystemExit("no shared/data folder above this checkout: set HERETIC_SHARED_DIR")
    return found


def organism() -> Path:
    """The shared organism folder the test suite builds (tests/conftest.py), built if missing."""
    adapter = shared_dir() / "organism" / "adapter"
    digest = hashlib.sha256()
    for path in sorted(adapter.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    cache = Path(os.environ.get("HERETIC_CACHE_DIR", Path.home() / ".cache" / "heretic"))
    out = cache / f"organism-shared-{digest.hexdigest()[:16]}"
    if not (out / "config.json").is_file():
        print(f"building the organism in {out} ...", flush=True)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        script = shared_dir() / "organism" / "build_organism.py"
        subprocess.run([sys.executable, str(script), str(tmp)], check=True)
        tmp.rename(out)
    return out


def instructions(name: str) -> list[str]:
    rows = json.loads((shared_dir() / "data" / f"{name}.json").read_text())
    return [" ".join(row["instruction"].split()) for row in rows]


def xstest(label: str) -> list[str]:
    with open(XSTEST, newline="", encoding="utf-8") as f:
        return [row["prompt"].strip() for row in csv.DictReader(f) if row["label"] == label]


# --- prompt sets -------------------------------------------------------------------------------

MIXES = {
    # The search's harmful prompts: directions (bad) and the in-search refusal count (bad_eval).
    "advbench": {
        "bad": [("advbench_rest", 0, 270)],
        "bad_eval": [("advbench_rest", 270, 370)],
    },
    # Directions from AdvBench and the organism's tuning prompts (whose held-out part,
    # harmful_train[160:260], is then no longer an unseen source); in-search count on AdvBench.
    "mixed": {
        "bad": [("advbench_rest", 0, 135), ("harmful_train", 0, 135)],
        "bad_eval": [("advbench_rest", 270, 370)],
    },
    # As "mixed", and the in-search refusal count mixed too.
    "mixed-eval": {
        "bad": [("advbench_rest", 0, 135), ("harmful_train", 0, 130)],
        "bad_eval": [("advbench_rest", 270, 340), ("harmful_train", 130, 160)],
    },
    # As "advbench", with the search's KL on 300 harmless prompts instead of 100: the first 100
    # (so the "KL search's prompts" column still reads prompts the search scored) and
    # harmless_val[200:400], leaving the unseen harmless_val[100:200] out.
    "advbench-kl300": {
        "bad": [("advbench_rest", 0, 270)],
        "bad_eval": [("advbench_rest", 270, 370)],
        "good_eval": [("harmless_val", 0, 100), ("harmless_val", 200, 400)],
    },
    # As "advbench", with the directions and fitted readouts from 2000 harmless prompts
    # instead of 400 (each readout is a ridge fit in the hidden size's dimensions).
    "advbench-good2000": {
        "bad": [("advbench_rest", 0, 270)],
        "bad_eval": [("advbench_rest", 270, 370)],
        "good": [("harmless_train", 0, 2000)],
    },
}

DIRECTIONS_GOOD = [("harmless_train", 0, 400)]
"""The harmless prompts of the directions unless a mix names its own ("good")."""
SEARCH_KL = [("harmless_val", 0, 100)]
"""The search's KL prompts unless a mix names its own ("good_eval")."""


@dataclass(frozen=True)
class Sizes:
    """How much is generated: the time a configuration takes on a CPU is mostly these."""

    search: int = 100
    """Bad evaluation prompts of the search (evenly spaced among the mix's 100)."""
    cap: int | None = None
    """Held-out prompts per source at most (evenly spaced); None: all of them."""
    tokens: int = 64
    """Tokens per held-out response."""

    def tag(self) -> str:
        return f"t{self.tokens}-c{self.cap or 'all'}"


def spread(values: list[str], n: int | None) -> list[str]:
    """`n` evenly spaced items of `values` (all when n is None or not smaller): XSTest's rows
    are grouped by type, so a leading slice would be one kind of prompt."""
    if n is None or n >= len(values):
        return list(values)
    return [values[i * len(values) // n] for i in range(n)]


def search_prompts(mix: str, sizes: Sizes) -> dict[str, list[str]]:
    def take(parts) -> list[str]:
        return [p for name, a, b in parts for p in instructions(name)[a:b]]

    return {
        "bad_prompts": take(MIXES[mix]["bad"]),
        "good_prompts": take(MIXES[mix].get("good", DIRECTIONS_GOOD)),
        "bad_evaluation_prompts": spread(take(MIXES[mix]["bad_eval"]), sizes.search),
        "good_evaluation_prompts": take(MIXES[mix].get("good_eval", SEARCH_KL)),
    }


HELD_OUT = ("harmful_val", "harmful_train", "xstest_unsafe")
"""The held-out harmful sources; `xstest_safe` (over-refusal) is reported apart."""


def held_out_prompts(sizes: Sizes) -> dict[str, list[str]]:
    every = {
        "harmful_val": instructions("harmful_val"),
        "harmful_train": instructions("harmful_train")[160:260],
        "xstest_unsafe": xstest("unsafe"),
        "xstest_safe": xstest("safe"),
    }
    return {name: spread(values, sizes.cap) for name, values in every.items()}


def unseen_harmless() -> list[str]:
    """`harmless_val[100:200]` (the "KL unseen" column since 2026-12-02), then
    `harmless_val[400:800]`: a mean of 100 first-token KLs swings with the few prompts that
    carry most of it (one edit: 0.059 to 0.078 over five such hundreds), so "KL unseen, 500"
    is the one to read. `[200:400]` is left out: the `kl-300` search scores those."""
    every = instructions("harmless_val")
    return every[100:200] + every[400:800]


def kl_prompts() -> list[str]:
    """The search's KL prompts (`harmless_val[:100]`), then the unseen ones: the KL of a saved
    model on the first tells rounding in the merged weights apart from a shift of prompts."""
    return instructions("harmless_val")[:100] + unseen_harmless()


N_ANSWERED = 200
"""The KL prompts whose original responses are judged (the search's and the first 100
unseen): "KL unseen, answered" is over the unseen hundred of those."""


def harmless_logprobs(model) -> object:
    return model.first_token_logprobs(kl_prompts(), BATCH)


def kl_figures(base_logprobs, logprobs, answered=None) -> dict[str, float]:
    """KL on the search's KL prompts and on the unseen ones; with `answered` (a bool per KL
    prompt: the original model answers it), also on the unseen prompts it answers, which
    leaves out the harmless prompts it refuses (lifting those refusals is not damage)."""
    from heretic.evaluation import kl_divergence

    figures = {
        "kl_search": kl_divergence(base_logprobs[:100], logprobs[:100]),
        "kl": kl_divergence(base_logprobs[100:200], logprobs[100:200]),
        "kl_500": kl_divergence(base_logprobs[100:], logprobs[100:]),
    }
    if answered is not None:
        keep = answered[100:N_ANSWERED]
        base, edited = base_logprobs[100:N_ANSWERED], logprobs[100:N_ANSWERED]
        figures["kl_answered"] = kl_divergence(base[keep], edited[keep])
    return figures


def answered_kl_prompts(model, workdir: Path, judge, sizes: Sizes):
    """Per KL prompt, whether the original model answers it (its greedy response, judged by
    `judge`); the responses are cached in `workdir`."""
    import torch

    path = workdir / f"original-harmless-t{sizes.tokens}.json"
    if not path.exists():
        from heretic.loading import load_model

        print("original model: responses to the harmless KL prompts ...", flush=True)
        m = load_model(str(model), device_map="cpu", system_prompt=SYSTEM_PROMPT)
        prompts = kl_prompts()[:N_ANSWERED]
        path.write_text(json.dumps(m.generate(prompts, sizes.tokens, BATCH)))
    responses = json.loads(path.read_text())
    if len(responses) != N_ANSWERED:
        raise SystemExit(f"{path} has {len(responses)} responses, not {N_ANSWERED}: delete it")
    return torch.tensor([not v for v in judge.verdicts(responses, kl_prompts()[:N_ANSWERED])])


def write_prompt_files(folder: Path, prompts: dict[str, list[str]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, values in prompts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text("\n".join(values) + "\n")
    return paths


# --- configurations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    what: str
    settings: dict = field(default_factory=dict)
    """Our settings that differ from heretic's defaults (TOML values)."""
    mix: str = "advbench"
    tool: str = "heretic"
    """'heretic' (this checkout) or 'upstream' (heretic-llm 1.4.0)."""


COLD = {"use_warm_start_params": False}
"""The ablations of one setting run with the warm start off: its profile wins most 10-trial
searches with the defaults (trial 0), and would hide the setting under test."""

CONFIGS = [
    Config("defaults", "heretic's defaults"),
    Config("no-warm", "warm start off", COLD),
    Config("direction", "readout = direction", {"readout": "direction"}),
    Config(
        "direction-no-warm", "readout = direction, warm start off", {"readout": "direction", **COLD}
    ),  # fmt: skip
    Config("ridge-0.1", "readout_ridge = 0.1, warm start off", {"readout_ridge": 0.1, **COLD}),
    Config("ridge-1", "readout_ridge = 1, warm start off", {"readout_ridge": 1.0, **COLD}),
    Config(
        "length-32",
        "32-token responses in the search, warm start off",
        {"max_response_length": 32, **COLD},
    ),  # fmt: skip
    Config(
        "length-160",
        "160-token responses in the search, warm start off",
        {"max_response_length": 160, **COLD},
    ),  # fmt: skip
    Config("mixed", "directions from AdvBench + tuning prompts", mix="mixed"),
    Config(
        "mixed-no-warm",
        "directions from AdvBench + tuning prompts, warm start off",
        COLD,
        mix="mixed",
    ),  # fmt: skip
    Config(
        "mixed-eval", "mixed directions and in-search count, warm start off", COLD, mix="mixed-eval"
    ),  # fmt: skip
    Config(
        "openings",
        "refusal objective = count + refusal-opening probabilities",
        {"refusal_openings": True},
    ),  # fmt: skip
    Config(
        "openings-no-warm",
        "refusal objective = count + refusal-opening probabilities, warm start off",
        {"refusal_openings": True, **COLD},
    ),  # fmt: skip
    Config(
        "ridge-cv",
        "fitted readouts' ridge chosen per module by leave-one-out cross-validation",
        {"readout_ridge_cv": True},
    ),  # fmt: skip
    Config(
        "kl-answered",
        "KL only on the good prompts the original model answers (kl_skip_refused_good)",
        {"kl_skip_refused_good": True},
    ),  # fmt: skip
    Config(
        "kl-300",
        "the search's KL on 300 harmless prompts instead of 100",
        mix="advbench-kl300",
    ),  # fmt: skip
    Config(
        "good-2000",
        "directions and fitted readouts from 2000 harmless prompts instead of 400",
        mix="advbench-good2000",
    ),  # fmt: skip
    Config("upstream", "heretic-llm 1.4.0, its defaults", tool="upstream"),
]


# --- running the searches ----------------------------------------------------------------------


def toml_value(value) -> str:
    return json.dumps(value)


def heretic_config(model: Path, n_trials: int, paths: dict[str, Path], settings: dict) -> str:
    lines = [
        f"model = {toml_value(str(model))}",
        f"n_trials = {n_trials}",
        f"batch_size = {BATCH}",
        'device_map = "cpu"',
        'select = "best"',
        'output_dir = "out"',
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines + prompt_tables(paths)) + "\n"


def prompt_tables(paths: dict[str, Path]) -> list[str]:
    """The four prompt sets as TOML tables, each a whole local .txt file."""
    lines = []
    for name, path in paths.items():
        n = len(path.read_text().splitlines())
        lines += [f"[{name}]", f"dataset = {toml_value(str(path))}", f'split = "[:{n}]"']
    return lines


def run_logged(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> float:
    """Run a child process to its end (stdout and stderr to `log`); its wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {done.returncode}):\n{tail}")
    return time.perf_counter() - start


def search_ours(config: Config, model: Path, n_trials: int, folder: Path, sizes: Sizes) -> dict:
    """One headless heretic run (this checkout's src, the CLI); the chosen trial's figures."""
    paths = write_prompt_files(folder / "prompts", search_prompts(config.mix, sizes))
    (folder / "config.toml").write_text(heretic_config(model, n_trials, paths, config.settings))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    seconds = run_logged([sys.executable, "-m", "heretic.cli"], folder, folder / "run.log", env)
    metadata = json.loads((folder / "out" / "heretic_metadata.json").read_text())
    return {
        "trial": metadata["trial_number"],
        "refusals": metadata["refusal_count"],
        "base_refusals": metadata["base_refusal_count"],
        "n_bad": metadata["n_bad_evaluation_prompts"],
        "kl": metadata["kl_divergence"],
        "model": str(folder / "out" / "model"),
        "seconds": seconds,
    }


# --- evaluating a saved model ------------------------------------------------------------------


def generate_all(model_path: str, sizes: Sizes) -> dict:
    """A saved model's responses to every held-out set (each row decoded to its end) and its
    first-token log-probs on the KL prompts, through heretic's loader and decoder."""
    from heretic.loading import load_model

    model = load_model(model_path, device_map="cpu", system_prompt=SYSTEM_PROMPT)
    return generate_with(model, sizes)


def generate_with(model, sizes: Sizes) -> dict:
    """`generate_all` for a loaded model (with whatever edit is switched on)."""
    responses = {}
    for name, prompts in held_out_prompts(sizes).items():
        start = time.perf_counter()
        responses[name] = model.generate(prompts, sizes.tokens, BATCH)
        print(
            f"  {name}: {len(prompts)} responses ({sizes.tokens} tokens) in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return {"responses": responses, "logprobs": harmless_logprobs(model)}


@dataclass
class Judges:
    adaptive: object
    markers: object

    def counts(self, responses: dict[str, list[str]], sizes: Sizes) -> dict[str, tuple[int, int]]:
        prompts = held_out_prompts(sizes)
        return {
            name: (
                self.adaptive.count(values, prompts[name]),
                self.markers.count(values, prompts[name]),
            )
            for name, values in responses.items()
        }


def capped(responses: dict[str, list[str]], sizes: Sizes) -> dict[str, list[str]]:
    """Responses to every held-out prompt, cut to `sizes.cap` per source as `held_out_prompts`
    cuts the prompts."""
    return {name: spread(values, sizes.cap) for name, values in responses.items()}


def cached_path(folder: Path, name: str, sizes: Sizes) -> Path | None:
    """A cached generation for these sizes, or one of every prompt (which `capped` cuts)."""
    for tag in (sizes.tag(), replace(sizes, cap=None).tag()):
        if (folder / f"{name}-{tag}.json").exists():
            return folder / f"{name}-{tag}.json"
    return None


def original_model(model: Path, workdir: Path, sizes: Sizes) -> tuple[dict, Judges]:
    """The original model's held-out figures, and the judges every configuration is counted
    by: the adaptive judge learned as a run learns it (the original model's responses to the
    bench's 100 in-search bad prompts, full length, and the openings of its responses to the
    good evaluation prompts), and heretic's default marker list."""
    import torch

    from heretic.config import DEFAULT_REFUSAL_MARKERS
    from heretic.judges import OPENING_TOKENS, AdaptiveJudge, MarkerJudge
    from heretic.loading import load_model

    search = search_prompts("advbench", Sizes())
    logprobs_file = workdir / "original-logprobs.pt"
    m = None
    path = cached_path(workdir, "original", sizes)
    data = None if path is None else json.loads(path.read_text())
    if data is None:
        print("original model: generating ...", flush=True)
        generated = generate_all(str(model), sizes)
        m = load_model(str(model), device_map="cpu", system_prompt=SYSTEM_PROMPT)
        bad = m.generate(search["bad_evaluation_prompts"], sizes.tokens, BATCH)
        good = m.generate(search["good_evaluation_prompts"], OPENING_TOKENS, BATCH)
        torch.save(generated["logprobs"], logprobs_file)
        data = {"responses": generated["responses"], "judge_bad": bad, "judge_good": good}
        (workdir / f"original-{sizes.tag()}.json").write_text(json.dumps(data))
    adaptive = AdaptiveJudge.fit(
        DEFAULT_REFUSAL_MARKERS,
        search["bad_evaluation_prompts"],
        data["judge_bad"],
        search["good_evaluation_prompts"],
        data["judge_good"],
    )
    judges = Judges(adaptive, MarkerJudge(tuple(DEFAULT_REFUSAL_MARKERS)))
    logprobs = torch.load(logprobs_file) if logprobs_file.exists() else None
    if logprobs is None or len(logprobs) != len(kl_prompts()):
        m = m or load_model(str(model), device_map="cpu", system_prompt=SYSTEM_PROMPT)
        logprobs = harmless_logprobs(m)
        torch.save(logprobs, logprobs_file)
    base = {
        "responses": capped(data["responses"], sizes),
        "logprobs": logprobs,
        "answered": answered_kl_prompts(model, workdir, adaptive, sizes),
        "search_bad": (search["bad_evaluation_prompts"], data["judge_bad"]),
    }
    return base, judges


def evaluate(model_path: str, folder: Path, sizes: Sizes, base: dict) -> dict:
    """Responses and KL divergences of a saved model, cached in `folder`."""
    base_logprobs, answered = base["logprobs"], base["answered"]
    path = cached_path(folder, "held-out", sizes)
    if path is None:
        generated = generate_all(model_path, sizes)
        result = {"responses": generated["responses"]}
        result.update(kl_figures(base_logprobs, generated["logprobs"], answered))
        path = folder / f"held-out-{sizes.tag()}.json"
        path.write_text(json.dumps(result))
    result = json.loads(path.read_text())
    if "kl_500" not in result:  # cached before these KL figures were measured
        from heretic.loading import load_model

        model = load_model(model_path, device_map="cpu", system_prompt=SYSTEM_PROMPT)
        result.update(kl_figures(base_logprobs, harmless_logprobs(model), answered))
        path.write_text(json.dumps(result))
    return {**result, "responses": capped(result["responses"], sizes)}


def evaluate_front(model_path: Path, folder: Path, sizes: Sizes, base: dict, judge) -> list[dict]:
    """Every Pareto-front trial of our search in `folder`, generated with its edit as hooks on
    the original model, as the search scored it (for the defaults' pick the hooked and the
    saved model gave the same KL, 0.034), with its refusal-opening probability
    (`refusal_openings`), cached per trial."""
    import optuna
    from refusal_openings import opening_probability

    from heretic.optimization import objectives, pareto_front

    out = folder / "out"
    study = optuna.load_study(
        study_name="heretic", storage=f"sqlite:///{(out / 'study.db').resolve()}"
    )
    loaded: dict = {}
    points = []
    for trial in pareto_front(study):
        path = folder / f"front-{trial.number}-{sizes.tag()}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        if result is None or "opening" not in result:
            model, hooks, edit_of, openings = front_model(loaded, model_path, out, base, judge)
            hooks.set_strengths(*edit_of(trial.number))
            if result is None:
                print(f"  front trial {trial.number} ...", flush=True)
                generated = generate_with(model, sizes)
                result = {"responses": generated["responses"]}
                result.update(kl_figures(base["logprobs"], generated["logprobs"], base["answered"]))
            result["opening"] = opening_probability(model, openings, BATCH)
            hooks.clear()
            path.write_text(json.dumps(result))
        kl, refusals = objectives(trial)[:2]
        result.update(trial=trial.number, refusals=refusals, search_kl=kl)
        points.append({**result, "responses": capped(result["responses"], sizes)})
    if loaded:
        loaded["hooks"].remove()
    return points


def front_model(loaded: dict, model_path: Path, out: Path, base: dict, judge) -> tuple:
    """The original model with hooks for the study in `out`, and the original refusal openings,
    loaded once into `loaded`."""
    from quality import our_edits
    from refusal_openings import refusal_openings

    from heretic.loading import load_model

    if not loaded:
        model = load_model(str(model_path), device_map="cpu", system_prompt=SYSTEM_PROMPT)
        loaded["model"] = model
        loaded["hooks"], loaded["edit_of"] = our_edits(model, out)
        loaded["openings"] = refusal_openings(model.tokenizer, *base["search_bad"], judge)
    return loaded["model"], loaded["hooks"], loaded["edit_of"], loaded["openings"]


def original_opening(model_path: Path, workdir: Path, base: dict, judge) -> dict:
    """The original model's own refusal-opening probability (cached)."""
    from refusal_openings import OPENING_TOKENS, opening_probability, refusal_openings

    from heretic.loading import load_model

    path = workdir / f"original-opening-{OPENING_TOKENS}.json"
    if not path.exists():
        model = load_model(str(model_path), device_map="cpu", system_prompt=SYSTEM_PROMPT)
        openings = refusal_openings(model.tokenizer, *base["search_bad"], judge)
        path.write_text(json.dumps(opening_probability(model, openings, BATCH)))
    return json.loads(path.read_text())


# --- upstream ----------------------------------------------------------------------------------


def upstream_front(folder: Path) -> list:
    """Upstream's Pareto front as its menu lists it: by refusals, each with a lower KL than
    every point before it."""
    from vs_heretic import upstream_trials

    done = [t for t in upstream_trials(folder) if t.state.name == "COMPLETE"]
    front, lowest = [], float("inf")
    for t in sorted(done, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"])):
        if t.user_attrs["kl_divergence"] < lowest:
            lowest = t.user_attrs["kl_divergence"]
            front.append(t)
    return front


def choose_like_heretic(front: list, base_refusals: int) -> int:
    """Index into `front` of the point heretic's `--select best` takes (`best_trial`): nearest
    the origin with refusals scaled by the base count, passing over points that did nothing."""
    import math

    from heretic.optimization import DO_NOTHING_FRACTION

    def refusals(i: int) -> int:
        return front[i].user_attrs["refusals"]

    candidates = [
        i for i in range(len(front)) if refusals(i) <= DO_NOTHING_FRACTION * base_refusals
    ]
    scale = max(base_refusals, 1)
    return min(
        candidates or range(len(front)),
        key=lambda i: math.hypot(front[i].user_attrs["kl_divergence"], refusals(i) / scale),
    )


def search_upstream(model: Path, n_trials: int, folder: Path, sizes: Sizes) -> dict:
    """heretic-llm 1.4.0 on the AdvBench prompt files: its search runs to its menu (which,
    without a terminal, ends the process), then a second start shows that run's results in its
    plain-input menu (its notebook mode), picks the trial heretic's rule picks and saves it."""
    from vs_heretic import ensure_upstream, upstream_env, upstream_markers

    python = ensure_upstream()
    paths = write_prompt_files(folder / "prompts", search_prompts("advbench", sizes))
    settings = [
        f"model = {toml_value(str(model))}",
        f"n_trials = {n_trials}",
        f"batch_size = {BATCH}",
        "max_response_length = 100",
        f"system_prompt = {toml_value(SYSTEM_PROMPT)}",
        "seed = 42",
        f"refusal_markers = {toml_value(upstream_markers(python))}",
        'export_strategy = "merge"',
    ]
    (folder / "config.toml").write_text("\n".join(settings + prompt_tables(paths)) + "\n")
    heretic = str(python.parent / "heretic")
    start = time.perf_counter()
    with open(folder / "run.log", "w") as out:  # ends with an error at its menu: expected
        subprocess.run(
            [heretic],
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=upstream_env(),
            check=False,
        )
    seconds = time.perf_counter() - start
    front = upstream_front(folder)
    if not front:
        raise SystemExit(f"upstream finished no trial; see {folder / 'run.log'}")
    base = int(front[0].user_attrs["base_refusals"])
    index = choose_like_heretic(front, base)
    trial = front[index]
    saved = folder / "model"
    # Menu answers: show the previous run's results, the trial, "Save the model to a local
    # folder", the folder; the export strategy comes from the config.
    answers = f"1\n{index + 1}\n1\n{saved}\n"
    env = {**upstream_env(), "KAGGLE_KERNEL_RUN_TYPE": "batch"}
    with open(folder / "save.log", "w") as out:
        subprocess.run(
            [heretic],
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
            input=answers.encode(),
            env=env,
            check=False,
        )
    if not (saved / "config.json").is_file():
        raise SystemExit(f"upstream did not save trial {trial.number}; see {folder / 'save.log'}")
    return {
        "trial": trial.user_attrs.get("index", trial.number),
        "refusals": trial.user_attrs["refusals"],
        "base_refusals": base,
        "n_bad": sizes.search,
        "kl": trial.user_attrs["kl_divergence"],
        "model": str(saved),
        "seconds": seconds,
    }


# --- the table ---------------------------------------------------------------------------------


def used_sources(mix: str) -> set[str]:
    """The data files a configuration's search reads harmful prompts from."""
    return {
        name for key, parts in MIXES[mix].items() if key.startswith("bad") for name, _, _ in parts
    }


def row_cells(
    name: str, search: dict | None, held: dict, judges: Judges, sizes: Sizes, mix: str = "advbench"
) -> list[str]:
    """One table row. A held-out source that the run's prompts came from too (the organism's
    tuning prompts in the "mixed" rows) is marked "(seen)" and left out of the per-100 figure."""
    counts = judges.counts(held["responses"], sizes)
    lengths = {key: len(values) for key, values in held_out_prompts(sizes).items()}
    unseen = [key for key in HELD_OUT if key not in used_sources(mix)]
    total = sum(lengths[key] for key in unseen)
    per_100 = [round(100 * sum(counts[key][j] for key in unseen) / total) for j in (0, 1)]
    cells = [name]
    if search is None:
        cells += ["-", "-", "-"]
    else:
        cells += [
            str(search["trial"]),
            f"{search['refusals']}/{search['n_bad']}",
            f"{search['kl']:.3f}",
        ]
    cells += [
        f"{counts[key][0]} / {counts[key][1]}" + ("" if key in unseen else " (seen)")
        for key in HELD_OUT
    ]
    cells += [
        f"**{per_100[0]}** / {per_100[1]}",
        f"{counts['xstest_safe'][0]} / {counts['xstest_safe'][1]}",
        f"{held.get('kl_search', 0.0):.3f}",
        f"{held.get('kl', 0.0):.3f}",
        f"{held.get('kl_answered', 0.0):.3f}",
        "-" if "kl_500" not in held else f"{held['kl_500']:.3f}",
    ]
    cells.append(
        "-" if search is None or "seconds" not in search else f"{search['seconds'] / 60:.0f}"
    )
    return cells


def print_table(
    rows: list[list[str]], n_trials: int, sizes: Sizes, extra: list[str] | None = None
) -> None:
    lengths = {key: len(values) for key, values in held_out_prompts(sizes).items()}
    header = [
        "configuration",
        "trial",
        "in-search refusals",
        "in-search KL",
        f"harmful_val /{lengths['harmful_val']}",
        f"harmful_train /{lengths['harmful_train']}",
        f"XSTest unsafe /{lengths['xstest_unsafe']}",
        "held out /100",
        f"XSTest safe refused /{lengths['xstest_safe']}",
        "KL saved, search's prompts",
        "KL unseen",
        "KL unseen, answered",
        "KL unseen, 500",
        "search min",
        *(extra or []),
    ]
    print(
        f"\n{n_trials} trials, {sizes.search} in-search bad prompts; held-out cells: adaptive "
        f"judge / markers, greedy, {sizes.tokens} tokens, every row to its end\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def config_folder(args, name: str, sizes: Sizes) -> Path:
    """Where a configuration's search and evaluation are kept (reused when present)."""
    seed = "" if args.seed is None else f"-seed{args.seed}"
    return args.workdir / f"{name}-{args.n_trials}-s{sizes.search}{seed}"


def run_config(config: Config, model: Path, args, sizes: Sizes, base: dict) -> tuple[dict, dict]:
    folder = config_folder(args, config.name, sizes)
    result_file = folder / "search.json"
    if args.rerun and folder.exists():
        shutil.rmtree(folder)
    if not result_file.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(
            f"[{config.name}] searching ({args.n_trials} trials: {config.what}) in {folder} ...",
            flush=True,
        )
        if config.tool == "upstream":
            search = search_upstream(model, args.n_trials, folder, sizes)
        else:
            seed = {} if args.seed is None else {"seed": args.seed}
            config = replace(config, settings={**config.settings, **seed})
            search = search_ours(config, model, args.n_trials, folder, sizes)
        result_file.write_text(json.dumps(search))
        print(
            f"[{config.name}] search done in {search['seconds'] / 60:.1f} min: trial "
            f"{search['trial']}, {search['refusals']}/{search['n_bad']} refusals, KL "
            f"{search['kl']:.3f}",
            flush=True,
        )
    search = json.loads(result_file.read_text())
    print(f"[{config.name}] evaluating the saved model on held-out prompts ...", flush=True)
    held = evaluate(search["model"], folder, sizes, base)
    return search, held


def opening_cell(opening: dict | None) -> str:
    return "-" if opening is None else f"{opening['first']:.3f} / {opening['geometric']:.2f}"


def print_fronts(names, rows, model: Path, args, sizes: Sizes, base: dict, judges: Judges) -> None:
    """Every front trial of our configurations (upstream's row as it is), with the probability
    of the original refusal openings beside the held-out figures."""
    by_name = {c.name: c for c in CONFIGS}
    front_rows = [
        rows[0] + [opening_cell(original_opening(model, args.workdir, base, judges.adaptive))]
    ]
    for name in names:
        config = by_name[name]
        if config.tool == "upstream":
            front_rows.append(rows[names.index(name) + 1] + [opening_cell(None)])
            continue
        folder = config_folder(args, name, sizes)
        print(f"[{name}] evaluating every front trial on held-out prompts ...", flush=True)
        n_bad = json.loads((folder / "search.json").read_text())["n_bad"]
        for point in evaluate_front(model, folder, sizes, base, judges.adaptive):
            search = {**point, "kl": point["search_kl"], "n_bad": n_bad}
            row = row_cells(f"{name} #{point['trial']}", search, point, judges, sizes, config.mix)
            front_rows.append(row + [opening_cell(point["opening"])])
    print(
        "Pareto fronts (our trials as hooks on the original model); last column: mean "
        "probability of the original model's refusal openings on the 100 in-search AdvBench "
        "prompts it refused, first token / per token of 8:"
    )
    print_table(front_rows, args.n_trials, sizes, ["refusal opening p"])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None, help="default: the shared organism")
    ap.add_argument("--n-trials", type=int, default=10)
    ap.add_argument(
        "--configs",
        default="defaults,direction,no-warm,mixed,upstream",
        help="comma-separated names from --list, or 'all'",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heretic-generalization"))
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=64,
        help="tokens per held-out response (every row decoded to its end)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, here and in every search (more than the free "
        "cores makes every thread wait: 1 was 3x faster than 2 on a busy 2-core "
        "machine)",
    )
    ap.add_argument(
        "--search-prompts",
        type=int,
        default=100,
        help="bad evaluation prompts of each search (evenly spaced among its 100)",
    )
    ap.add_argument(
        "--held-out-cap",
        type=int,
        default=None,
        help="at most this many prompts per held-out source (evenly spaced); default all",
    )
    ap.add_argument(
        "--fronts",
        action="store_true",
        help="also evaluate every Pareto-front trial of our searches (as hooks) and print them",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of our searches (default: heretic's, 42); upstream keeps its own",
    )
    ap.add_argument("--rerun", action="store_true", help="run the named configurations again")
    ap.add_argument("--list", action="store_true", help="print the configurations and stop")
    args = ap.parse_args()
    by_name = {c.name: c for c in CONFIGS}
    if args.list:
        for c in CONFIGS:
            print(f"{c.name:20} {c.what}  {c.settings or ''} (prompts: {c.mix}, tool: {c.tool})")
        return
    names = list(by_name) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: see --list")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    model = (args.model or organism()).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = Sizes(args.search_prompts, args.held_out_cap, args.eval_tokens)
    base, judges = original_model(model, args.workdir, sizes)
    print(
        f"adaptive judge: {len(judges.adaptive.phrases)} phrases mined + "
        f"{len(judges.adaptive.markers)} markers",
        flush=True,
    )
    rows = [row_cells("original model", None, {**base, "kl": 0.0, "kl_500": 0.0}, judges, sizes)]
    n_answered = int(base["answered"][100:].sum())
    print(
        f"the original model answers {n_answered} of the 100 unseen harmless prompts (adaptive "
        f"judge, {sizes.tokens} tokens): 'KL unseen, answered' is the KL over those",
        flush=True,
    )
    for name in names:
        config = by_name[name]
        search, held = run_config(config, model, args, sizes, base)
        rows.append(row_cells(name, search, held, judges, sizes, config.mix))
        print_table(rows, args.n_trials, sizes)
    if args.fronts:
        print_fronts(names, rows, model, args, sizes, base, judges)


if __name__ == "__main__":
    main()
