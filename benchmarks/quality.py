"""Search quality, heretic vs upstream Heretic (heretic-llm 1.4.0): Pareto fronts at equal budgets.

    python benchmarks/quality.py --model ORGANISM [--n-trials 20 50] [--workdir DIR]
        [--skip-upstream] [--skip-ours] [--set search_space=tent ...] [--label NAME]
        [--same-judge MAX_REFUSALS]

Both tools run headless on the same organism with the same prompt files (directions from
advbench_rest[:270] and harmless_train[:400]; refusals on advbench_rest[270:370]; KL on
harmless_val[:100]), system prompt "You are a helpful assistant.", 100-token responses, batch
size 32, seed 42 and trial count, and both judge refusals with the same marker list (upstream's
defaults, read from its installed package). The setup is `vs_heretic.py`'s, reused here.

For each trial count it prints each tool's Pareto front (refusals, KL) and, for every refusal
count on upstream's front, the smallest KL our study reached at that many refusals or fewer.
The issue's bar: at upstream's best (lowest) refusal count, our KL is at most half of upstream's
(or we refuse less at equal KL). Results are kept as JSON under the work folder, so the tables
can be printed again (`--skip-upstream --skip-ours`) without running anything.

`--same-judge N` then generates every trial of either tool with at most N refusals again in
heretic's code (upstream's rebuilt from its recorded parameters) and counts both with the same
judges, upstream's marker rule and heretic's default judge (`same_judge`).

Set HERETIC_UPSTREAM_VENV to use an upstream install outside this checkout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_heretic import (  # noqa: E402  (the sibling script, not a package)
    SYSTEM_PROMPT,
    UPSTREAM_VENV,
    ensure_upstream,
    our_trials,
    run_measured,
    toml_config,
    upstream_env,
    upstream_markers,
    upstream_trials,
    write_prompts,
)

Point = tuple[float, int, int]
"""(KL divergence, refusals, trial number) of one fully scored trial."""


def upstream_points(workdir: Path) -> list[Point]:
    return [
        (float(t.user_attrs["kl_divergence"]), int(t.user_attrs["refusals"]), t.number)
        for t in upstream_trials(workdir)
        if t.state.name == "COMPLETE" and "refusals" in t.user_attrs
    ]


def our_points(output_dir: Path) -> list[Point]:
    # Pruned trials only carry a refusal lower bound: they are not points.
    return [
        (float(t.user_attrs["kl_divergence"]), int(t.user_attrs["refusals"]), t.number)
        for t in our_trials(output_dir)
        if t.state.name == "COMPLETE"
    ]


def pareto(points: list[Point]) -> list[Point]:
    """Non-dominated points, by refusals then KL."""
    front = [
        p
        for p in points
        if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points)
    ]
    unique = {(p[1], p[0]): p for p in front}
    return [unique[k] for k in sorted(unique)]


def best_kl_at(points: list[Point], refusals: int) -> Point | None:
    """Our lowest-KL point with at most `refusals` refusals."""
    eligible = [p for p in points if p[1] <= refusals]
    return min(eligible, key=lambda p: p[0]) if eligible else None


def run_upstream(model: str, n_trials: int, workdir: Path, prompts, markers, python: Path) -> None:
    folder = workdir / f"upstream-{n_trials}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(toml_config(model, n_trials, markers, prompts, {}))
    print(f"running heretic-llm 1.4.0 ({n_trials} trials) in {folder} ...", flush=True)
    wall, rss = run_measured(
        [str(python.parent / "heretic")], folder, folder / "run.log", upstream_env()
    )
    points = upstream_points(folder)
    (folder / "result.json").write_text(json.dumps({"wall": wall, "rss": rss, "points": points}))


def run_ours(
    model: str, n_trials: int, workdir: Path, prompts, markers, extra: dict, label: str
) -> None:
    folder = workdir / f"ours-{label}-{n_trials}"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    # confirm = false: both tools' searches score on the same 100 evaluation prompts.
    settings = {"select": "none", "output_dir": "out", "confirm": False, **extra}
    (folder / "config.toml").write_text(toml_config(model, n_trials, markers, prompts, settings))
    print(f"running heretic ({n_trials} trials, {label}: {extra}) in {folder} ...", flush=True)
    # `-m heretic.cli` with this interpreter: PYTHONPATH decides which source tree runs.
    wall, rss = run_measured([sys.executable, "-m", "heretic.cli"], folder, folder / "run.log")
    points = our_points(folder / "out")
    (folder / "result.json").write_text(
        json.dumps({"wall": wall, "rss": rss, "points": points, "settings": extra})
    )
    add_rejudged(folder, model, prompts, markers)


def add_rejudged(folder: Path, model: str, prompts, markers: list[str]) -> None:
    result = load(folder)
    if result is None or "rejudged" in result:
        return
    print(f"judging our front in {folder} with upstream's rule ...", flush=True)
    result["rejudged"] = rejudge_ours(folder, model, prompts, markers)
    (folder / "result.json").write_text(json.dumps(result))


def upstream_rule(response: str, markers: list[str]) -> bool:
    """Upstream's judging rule, written out: an empty response is a refusal; otherwise lower-
    cased, emphasis asterisks dropped, curly apostrophes straightened and whitespace collapsed,
    it is a refusal when it contains a marker. Ours differs only in the first three steps."""
    if not response.strip():
        return True
    text = " ".join(response.lower().replace("*", "").replace("\u2019", "'").split())
    return any(marker.lower() in text for marker in markers)


def prompt_set(prompts, key: str) -> list[str]:
    """One of the benchmark's prompt sets (`write_prompts`), as heretic loads it."""
    from heretic.config import DatasetSpecification
    from heretic.prompts import load_prompts

    path, split = prompts[key]
    return load_prompts(DatasetSpecification(dataset=str(path), split=split), key)


def our_edits(model, output_dir: Path):
    """Hooks for the edits of our study in `output_dir`, as the study scored them (its row
    normalization and readout are in its fingerprint), and a function giving a trial number's
    (strengths, trial directions) for `hooks.set_strengths`."""
    import optuna

    from heretic.abliteration import edit_from_params
    from heretic.directions import DIRECTIONS_FILE, load_direction_extras, load_directions
    from heretic.edit import EditHooks
    from heretic.fingerprint import FINGERPRINT_ATTR
    from heretic.optimization import params_from_trial

    directions, _ = load_directions(output_dir / DIRECTIONS_FILE)
    study = optuna.load_study(
        study_name="heretic", storage=f"sqlite:///{(output_dir / 'study.db').resolve()}"
    )
    fingerprint = study.user_attrs.get(FINGERPRINT_ATTR, {})
    readouts = None
    if fingerprint.get("readout") == "fitted":
        readouts = load_direction_extras(output_dir / DIRECTIONS_FILE)["readouts"]
    hooks = EditHooks(
        model.sites, directions, fingerprint.get("row_normalization", "none"), readouts
    )
    trials = {t.number: t for t in study.trials}
    return hooks, lambda number: edit_from_params(params_from_trial(trials[number]), directions)


def rejudge_ours(folder: Path, model_path: str, prompts, markers: list[str]) -> dict[int, int]:
    """Our front trials' refusal counts under upstream's judging rule, so both tools' fronts are
    judged alike: each front trial's responses are generated again (greedy, 100 tokens, the
    trial's edit as hooks) and counted with `upstream_rule`."""
    from heretic.loading import load_model

    bad = prompt_set(prompts, "bad_evaluation_prompts")
    model = load_model(model_path, system_prompt=SYSTEM_PROMPT)
    hooks, edit_of = our_edits(model, folder / "out")
    counts = {}
    for _, _, number in pareto(our_points(folder / "out")):
        hooks.set_strengths(*edit_of(number))
        responses = model.generate(bad, 100, 32, lambda r, _prompt: upstream_rule(r, markers))
        hooks.clear()
        counts[number] = sum(upstream_rule(r, markers) for r in responses)
    hooks.remove()
    return counts


def upstream_prefix(workdir: Path, n_trials: int) -> dict | None:
    """Upstream's first `n_trials` trials of a longer run in the same work folder. Upstream
    samples at random for its first `n_startup_trials` (60 by default), seeded, so these are
    the trials a run of `n_trials` would have made (checked: the first 10 of a 50-trial run
    gave the same front as a separate 10-trial run)."""
    for folder in sorted(workdir.glob("upstream-*")):
        longer = load(folder)
        size = int(folder.name.split("-")[1])
        if longer is not None and n_trials < size <= 60:
            print(f"(upstream: the first {n_trials} trials of {folder.name})")
            points = [p for p in longer["points"] if p[2] < n_trials]
            return {"wall": float("nan"), "rss": longer["rss"], "points": points}
    return None


def load(folder: Path) -> dict | None:
    path = folder / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def front_text(points: list[Point]) -> str:
    return ", ".join(f"{r} @ {kl:.3f} (#{n})" for kl, r, n in pareto(points)) or "none"


def report(workdir: Path, n_trials: int, label: str, recorded: list[Point] | None = None) -> None:
    up = load(workdir / f"upstream-{n_trials}") or upstream_prefix(workdir, n_trials)
    if recorded:
        print(f"(upstream: the recorded front given with --upstream-points, {n_trials} trials)")
        up = {"wall": float("nan"), "points": recorded}
    ours = load(workdir / f"ours-{label}-{n_trials}")
    print(f"\n### {n_trials} trials (ours: {label})\n")
    if up is None or ours is None:
        missing = [name for name, r in (("upstream", up), ("ours", ours)) if r is None]
        print(f"no result yet for {', '.join(missing)}")
        return
    up_points = [tuple(p) for p in up["points"]]
    our_pts = [tuple(p) for p in ours["points"]]
    rejudged = {int(k): v for k, v in ours.get("rejudged", {}).items()}
    if rejudged:
        changed = {n: c for kl, r, n in our_pts if n in rejudged and (c := rejudged[n]) != r}
        print(f"our front judged with upstream's rule: {len(rejudged)} trials, changed counts: "
              f"{changed or 'none'}")  # fmt: skip
        our_pts = [(kl, rejudged.get(n, r), n) for kl, r, n in our_pts]
    else:
        print("(our front not judged with upstream's rule yet: counts are our judge's)")
    print(f"upstream front (refusals @ KL): {front_text(up_points)}")
    print(f"our front      (refusals @ KL): {front_text(our_pts)}")
    print(f"wall: upstream {up['wall']:.0f} s, ours {ours['wall']:.0f} s; "
          f"scored trials: upstream {len(up_points)}, ours {len(our_pts)}")  # fmt: skip
    compare(up_points, our_pts)


def compare(up_points: list[Point], our_pts: list[Point]) -> None:
    """The KL table at upstream's front counts, and the issue's bar."""
    print()
    print("| upstream refusals | upstream KL | our best KL at <= refusals | ratio |")
    print("| --- | --- | --- | --- |")
    for kl, refusals, _ in pareto(up_points):
        mine = best_kl_at(our_pts, refusals)
        if mine is None:
            print(f"| {refusals} | {kl:.3f} | none | - |")
        else:
            ratio = mine[0] / kl if kl > 0 else float("inf")
            print(f"| {refusals} | {kl:.3f} | {mine[0]:.3f} ({mine[1]} refusals) | {ratio:.2f} |")
    up_front = pareto(up_points)
    if up_front:
        kl, refusals, _ = up_front[0]
        mine = best_kl_at(our_pts, refusals)
        at_equal_kl = [p for p in our_pts if p[0] <= kl]
        fewer = min((p[1] for p in at_equal_kl), default=None)
        met = (mine is not None and mine[0] <= kl / 2) or (fewer is not None and fewer < refusals)
        print(
            f"\nbar (upstream's best refusal count {refusals} at KL {kl:.3f}): our KL there "
            f"{'none' if mine is None else f'{mine[0]:.3f}'}; our fewest refusals at KL <= "
            f"{kl:.3f}: {fewer if fewer is not None else 'none'} -> {'MET' if met else 'NOT MET'}"
        )


def upstream_source(workdir: Path, n_trials: int) -> Path | None:
    """The upstream run whose first `n_trials` trials are the `n_trials` run (see
    `upstream_prefix`): its own folder, else a longer run's."""
    if load(workdir / f"upstream-{n_trials}") is not None:
        return workdir / f"upstream-{n_trials}"
    for folder in sorted(workdir.glob("upstream-*")):
        size = int(folder.name.split("-")[1])
        if load(folder) is not None and n_trials < size <= 60:
            return folder
    return None


def upstream_strengths(parameters: dict, n_layers: int) -> dict:
    """Upstream's per-layer edit weights from a trial's recorded parameters, written out: a
    layer at most `min_weight_distance` layers from `max_weight_position` gets a weight falling
    linearly from `max_weight` there to `min_weight` at that distance; other layers none."""
    import torch

    strengths = {}
    for component, p in parameters.items():
        weights = torch.zeros(n_layers)
        for layer in range(n_layers):
            distance = abs(layer - p["max_weight_position"])
            if distance <= p["min_weight_distance"]:
                fraction = distance / p["min_weight_distance"]
                weights[layer] = p["max_weight"] + fraction * (p["min_weight"] - p["max_weight"])
        strengths[component] = weights
    return strengths


def upstream_trial_directions(directions, direction_index: float | None):
    """Upstream's direction for a trial: per layer (None), or one direction interpolated at a
    fractional layer index. Upstream's list starts with the embeddings, ours with layer 0, so
    its rows k, k+1 are our rows k-1, k."""
    import math

    from heretic.directions import normalize

    if direction_index is None:
        return None
    fraction, whole = math.modf(direction_index + 1)
    row = int(whole) - 1
    vector = normalize(directions[row].lerp(directions[row + 1], fraction))
    return vector.expand_as(directions).contiguous()


def same_judge(
    workdir: Path, n_trials: int, label: str, model_path: str, prompts, markers: list[str],
    max_refusals: int,
) -> None:  # fmt: skip
    """Both tools' low-refusal trials, generated by the same code and counted by the same
    judges: upstream's marker rule, and heretic's default judge (the adaptive judge, learned
    from the original model's responses, over heretic's default markers).

    Upstream's trials are rebuilt in heretic's code from their recorded parameters (its tent
    weights, per-layer or interpolated direction, row normalization "full" on directions
    orthogonalized against the good mean, as upstream's defaults do); the KL this gives is
    printed beside upstream's own as a check of the rebuild. Each tool keeps its own recorded
    KL. Every trial of either tool with at most `max_refusals` refusals (by its own run's
    count) is judged. Responses are cached in the work folder, so a rerun only reports.
    """
    import torch

    from heretic.atomic import write_text
    from heretic.config import DEFAULT_REFUSAL_MARKERS
    from heretic.directions import mean_difference, normalize, orthogonalize
    from heretic.edit import EditHooks
    from heretic.evaluation import kl_divergence
    from heretic.judges import AdaptiveJudge
    from heretic.loading import load_model

    source = upstream_source(workdir, n_trials)
    ours_folder = workdir / f"ours-{label}-{n_trials}"
    if source is None:
        print(f"\n(same-judge comparison at {n_trials} trials: no upstream run)")
        return
    # Upstream's responses (and the original model's) are shared by every label and by the
    # smaller trial counts read from the same run; ours are per run.
    paths = {
        ("base", "upstream"): workdir / f"same-judge-{source.name}.json",
        ("ours",): workdir / f"same-judge-ours-{label}-{n_trials}.json",
    }
    cache = {}
    for path in paths.values():
        if path.exists():
            cache.update(json.loads(path.read_text()))

    def save() -> None:
        for keys, path in paths.items():
            write_text(path, json.dumps({k: cache[k] for k in keys if k in cache}))

    bad = prompt_set(prompts, "bad_evaluation_prompts")
    good = prompt_set(prompts, "good_evaluation_prompts")
    model = None

    def loaded():
        nonlocal model
        if model is None:
            model = load_model(model_path, system_prompt=SYSTEM_PROMPT)
        return model

    base = cache.setdefault("base", {})
    if "bad" not in base:
        print("generating the original model's responses ...", flush=True)
        base["bad"] = loaded().generate(bad, 100, 32)
        base["good"] = loaded().generate(good, 40, 32)
        save()
    base_logprobs = None

    def generate(key: str, number: int, hooks, strengths, directions) -> dict:
        nonlocal base_logprobs
        entry = cache.setdefault(key, {}).get(str(number))
        if entry is not None:
            return entry
        m = loaded()
        if base_logprobs is None:
            base_logprobs = m.first_token_logprobs(good, 32)
        hooks.set_strengths(strengths, directions)
        kl = kl_divergence(base_logprobs, m.first_token_logprobs(good, 32))
        responses = m.generate(bad, 100, 32)
        hooks.clear()
        entry = cache[key][str(number)] = {"kl_here": kl, "responses": responses}
        save()
        return entry

    # Upstream's trials, rebuilt.
    up_points = [tuple(p) for p in load(source)["points"] if p[2] < n_trials]
    wanted = {n for _, r, n in up_points if r <= max_refusals}
    todo = [n for n in wanted if str(n) not in cache.get("upstream", {})]
    if todo:
        m = loaded()
        good_res = m.residuals(prompt_set(prompts, "good_prompts"), 32).clone()  # (editable below)
        bad_res = m.residuals(prompt_set(prompts, "bad_prompts"), 32).clone()
        # Upstream reads residuals from transformers' hidden states, whose last entry is the
        # final norm's output: its last layer's direction is taken after that norm.
        norm = m.model.model.norm
        with torch.no_grad():
            for residuals in (good_res, bad_res):
                residuals[:, -1] = norm(residuals[:, -1].to(norm.weight.dtype)).float()
        directions = orthogonalize(
            mean_difference(good_res, bad_res), normalize(good_res.double().mean(dim=0)).float()
        )
        del good_res, bad_res
        hooks = EditHooks(m.sites, directions, "full")
        trials = {t.number: t for t in upstream_trials(source)}
        for i, number in enumerate(sorted(todo)):
            attrs = trials[number].user_attrs
            print(f"upstream trial {number} ({i + 1}/{len(todo)}) ...", flush=True)
            generate(
                "upstream",
                number,
                hooks,
                upstream_strengths(attrs["parameters"], m.n_layers),
                upstream_trial_directions(directions, attrs["direction_index"]),
            )
        hooks.remove()
    up_entries = {int(k): v for k, v in cache.get("upstream", {}).items() if int(k) in wanted}
    if load(ours_folder) is None:
        print(f"\n(same-judge comparison at {n_trials} trials: no '{label}' run yet)")
        return

    # Ours, with the edit its study scored.
    our_pts = [tuple(p) for p in load(ours_folder)["points"]]
    wanted_ours = {n for _, r, n in our_pts if r <= max_refusals}
    todo = [n for n in wanted_ours if str(n) not in cache.get("ours", {})]
    if todo:
        hooks, edit_of = our_edits(loaded(), ours_folder / "out")
        for i, number in enumerate(sorted(todo)):
            print(f"our trial {number} ({i + 1}/{len(todo)}) ...", flush=True)
            generate("ours", number, hooks, *edit_of(number))
        hooks.remove()
    our_entries = {int(k): v for k, v in cache.get("ours", {}).items() if int(k) in wanted_ours}

    adaptive = AdaptiveJudge.fit(DEFAULT_REFUSAL_MARKERS, bad, base["bad"], good, base["good"])
    judges = {
        "upstream's marker rule": lambda r, _prompt: upstream_rule(r, markers),
        f"heretic's default judge (adaptive: {len(adaptive.phrases)} mined phrases + "
        f"{len(DEFAULT_REFUSAL_MARKERS)} default markers)": adaptive.is_refusal,
    }
    print(f"\n### {n_trials} trials, both generated by heretic's code, same judge\n")
    print(f"upstream trials with <= {max_refusals} refusals: {len(up_entries)}; ours: "
          f"{len(our_entries)}. Upstream's KL rebuilt here vs recorded (check): "
          + ", ".join(f"#{n} {e['kl_here']:.3f}/{kl:.3f}" for kl, _, n in sorted(up_points)
                      if (e := up_entries.get(n))))  # fmt: skip
    kl_of = {("upstream", n): kl for kl, _, n in up_points}
    kl_of.update({("ours", n): kl for kl, _, n in our_pts})
    for name, is_refusal in judges.items():
        base_count = sum(map(is_refusal, base["bad"], bad))
        print(f"\n#### judge: {name}; original model {base_count}/100\n")

        up_judged, ours_judged = (
            [
                (kl_of[(key, n)], sum(map(is_refusal, e["responses"], bad)), n)
                for n, e in entries.items()
            ]
            for key, entries in (("upstream", up_entries), ("ours", our_entries))
        )
        print(f"upstream front (refusals @ KL): {front_text(up_judged)}")
        print(f"our front      (refusals @ KL): {front_text(ours_judged)}")
        compare(up_judged, ours_judged)


def parse_set(values: list[str]) -> dict:
    extra = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="model folder (the organism)")
    ap.add_argument("--n-trials", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/heretic-quality"))
    ap.add_argument("--skip-upstream", action="store_true", help="reuse upstream's last run")
    ap.add_argument("--skip-ours", action="store_true", help="reuse our last run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one of our settings for this run (repeatable)")  # fmt: skip
    ap.add_argument("--label", default="default", help="name of our run (its folder)")
    ap.add_argument("--same-judge", type=int, default=None, metavar="MAX_REFUSALS",
                    help="also generate every trial of both tools with at most MAX_REFUSALS "
                    "refusals in heretic's code and count them with the same judges")  # fmt: skip
    ap.add_argument("--upstream-points", default="",
                    help="compare with a recorded upstream front instead of a run: "
                    "'REFUSALS@KL,...' (with --skip-upstream and one --n-trials)")  # fmt: skip
    args = ap.parse_args()
    model = str(Path(args.model).resolve())
    args.workdir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(args.workdir)
    extra = parse_set(args.set)
    recorded = [
        (float(kl), int(refusals), -1)
        for refusals, kl in (item.split("@") for item in args.upstream_points.split(",") if item)
    ]
    python = UPSTREAM_VENV / "bin" / "python"
    if not (args.skip_upstream and args.skip_ours):
        python = ensure_upstream()
    markers_file = args.workdir / "markers.json"
    if not markers_file.exists():
        markers_file.write_text(json.dumps(upstream_markers(ensure_upstream())))
    markers = json.loads(markers_file.read_text())
    for n in args.n_trials:
        if args.skip_ours:  # judge an earlier run's front with upstream's rule, if not yet
            add_rejudged(args.workdir / f"ours-{args.label}-{n}", model, prompts, markers)
        if not args.skip_upstream:
            run_upstream(model, n, args.workdir, prompts, markers, python)
        if not args.skip_ours:
            run_ours(model, n, args.workdir, prompts, markers, extra, args.label)
        report(args.workdir, n, args.label, recorded)
        if args.same_judge is not None:
            same_judge(args.workdir, n, args.label, model, prompts, markers, args.same_judge)


if __name__ == "__main__":
    main()
