"""Prompts the search never sees: the held-out split of the evaluation sets, or the user's own.

The search picks its trial as the best of many noisy measurements on the same evaluation
prompts, so its figures flatter the chosen edit. The confirmation after the search scores the
chosen trial once more on prompts no part of the search used. By default they are a share
(`confirmation_holdout`) of each evaluation set, taken away from the search before it starts;
`confirmation_bad_prompts` / `confirmation_good_prompts` give other sets instead (the search
then keeps its evaluation sets whole).

Disjoint by construction: a prompt is held out by its *text* (every copy of it goes to the same
side), chosen by the rank of its SHA-256 among the texts that no other loaded set holds, so a
held-out prompt is in no direction set, no refinement set and no other evaluation set, and
reruns and workers hold out the same prompts whatever the order of the file. A given
confirmation set loses, with a notice, every prompt the search uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from heretic.config import DatasetSpecification, Settings
from heretic.errors import DatasetError

CONFIRMATION_SETS = {
    "bad_evaluation_prompts": "confirmation_bad_prompts",
    "good_evaluation_prompts": "confirmation_good_prompts",
}
"""Each evaluation set, and the setting that replaces its held-out share."""
PERPLEXITY_TEXTS = "perplexity_texts"
HOLDOUT_KEY = "evaluation_holdout"
"""Study key entry (see `fingerprint.study_key`): the evaluation sets that lose a share."""


@dataclass(frozen=True)
class HeldOutSet:
    """The prompts of one side (harmful or harmless) of the confirmation, and where from."""

    prompts: list[str]
    source: str
    """How they were chosen, for the report, the metadata and the card."""
    left_out: int = 0
    """Prompts of a given confirmation set left out because the search uses them."""
    split_from: str | None = None
    """The evaluation set they were held out of (None: a given confirmation set)."""


@dataclass(frozen=True)
class AfterSearchSets:
    """What the steps after the search score on: held-out prompts (None with confirm off) and
    the user's perplexity texts (None: the default text, or no perplexity)."""

    bad: HeldOutSet | None
    good: HeldOutSet | None
    texts: list[str] | None = None
    texts_source: str = ""


def _spec_text(spec: DatasetSpecification) -> str:
    split = f" split `{spec.split}`" if spec.split else ""
    return f"`{spec.dataset}`{split}"


def sets_to_load(settings: Settings) -> tuple[str, ...]:
    """The settings' after-search prompt sets that are given, to load with the others."""
    names = [name for name in CONFIRMATION_SETS.values() if getattr(settings, name) is not None]
    if getattr(settings, PERPLEXITY_TEXTS) is not None:
        names.append(PERPLEXITY_TEXTS)
    return tuple(names)


def evaluation_holdout(settings: Settings) -> dict[str, float]:
    """The evaluation sets whose held-out share the search does without ({} when none): part
    of the study key, since trials scored on other prompts are not comparable."""
    if not settings.confirm:
        return {}
    return {
        name: settings.confirmation_holdout
        for name, given in CONFIRMATION_SETS.items()
        if getattr(settings, given) is None
    }


def text_rank(text: str) -> str:
    """A prompt's place in the held-out draw: its SHA-256, independent of file order and seed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_off(
    prompts: Sequence[str], fraction: float, elsewhere: set[str], setting: str
) -> tuple[list[str], list[str]]:
    """(the search's prompts, the held-out prompts) of one evaluation set.

    `round(fraction * distinct texts)` texts (at least one) are held out: those of lowest
    `text_rank` among the texts not in `elsewhere` (the other sets' texts). The search keeps
    the rest in their order, duplicates included; the held-out list has each text once.
    """
    distinct = list(dict.fromkeys(prompts))
    wanted = max(1, round(fraction * len(distinct)))
    if wanted >= len(distinct):
        raise DatasetError(
            f"{setting}: holding out {wanted} of its {len(distinct)} distinct prompts would "
            "leave the search none. Use a larger set, lower confirmation_holdout, give "
            f"{CONFIRMATION_SETS[setting]}, or set confirm = false."
        )
    candidates = sorted((t for t in distinct if t not in elsewhere), key=text_rank)
    held = set(candidates[:wanted])
    if not held:
        raise DatasetError(
            f"{setting}: every prompt is also in another prompt set, so none can be held out "
            f"for the confirmation. Use disjoint sets, give {CONFIRMATION_SETS[setting]}, or "
            "set confirm = false."
        )
    search = [p for p in prompts if p not in held]
    return search, [t for t in distinct if t in held]


def hold_out(
    settings: Settings,
    prompts: Mapping[str, list[str]],
    log: Callable[[str], None] = lambda _line: None,
) -> tuple[dict[str, list[str]], AfterSearchSets | None]:
    """The prompt sets the search uses, and what the steps after it score on (None: nothing).

    `prompts` holds every loaded set, the after-search ones (`sets_to_load`) included; they
    are taken out of the returned dict, and the evaluation sets lose their held-out share.
    """
    search = {k: list(v) for k, v in prompts.items() if k not in sets_to_load(settings)}
    held: dict[str, HeldOutSet] = {}
    if settings.confirm:
        for name, given in CONFIRMATION_SETS.items():
            if getattr(settings, given) is not None:
                continue
            elsewhere = {t for other, values in search.items() if other != name for t in values}
            kept, out = split_off(search[name], settings.confirmation_holdout, elsewhere, name)
            spec = getattr(settings, name)
            held[name] = HeldOutSet(
                out,
                f"{name} ({_spec_text(spec)}), held out of the search",
                split_from=name,
            )
            search[name] = kept
        used = {t for values in search.values() for t in values}
        for name, given in CONFIRMATION_SETS.items():
            if name not in held:
                held[name] = _given_set(given, prompts[given], used, getattr(settings, given))
        for name, values in held.items():
            kind = name.split("_")[0]
            log(
                f"held out for the confirmation: {len(values.prompts)} {kind} prompts, "
                + values.source
            )
    texts = prompts.get(PERPLEXITY_TEXTS)
    if not held and texts is None:
        return search, None
    texts_source = ""
    if texts is not None:
        texts_source = f"{PERPLEXITY_TEXTS} ({_spec_text(settings.perplexity_texts)})"  # type: ignore[arg-type]
    sets = AfterSearchSets(
        held.get("bad_evaluation_prompts"), held.get("good_evaluation_prompts"), texts, texts_source
    )
    check_disjoint(search, sets)
    return search, sets


def _given_set(
    setting: str, prompts: list[str], used: set[str], spec: DatasetSpecification
) -> HeldOutSet:
    distinct = list(dict.fromkeys(prompts))
    kept = [p for p in distinct if p not in used]
    if not kept:
        raise DatasetError(
            f"{setting}: all its {len(distinct)} prompts are also prompts the search uses, so "
            "nothing is left to confirm on. Give prompts that no other prompt set holds."
        )
    left_out = len(distinct) - len(kept)
    source = f"{setting} ({_spec_text(spec)})"
    if left_out:
        source += f", less the {left_out} prompts the search uses"
    return HeldOutSet(kept, source, left_out)


def check_disjoint(search: Mapping[str, list[str]], sets: AfterSearchSets) -> None:
    """No held-out prompt is one the search uses (a bug if this ever fails, hence no advice)."""
    used = {t for values in search.values() for t in values}
    for held in (sets.bad, sets.good):
        if held is not None and used.intersection(held.prompts):
            raise AssertionError("held-out prompts overlap the search's prompts")
