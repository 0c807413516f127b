"""After the search: what can be done with a trial (save, upload, chat, plot, search more).

The interactive menu (`menu.py`) and the headless path (`--select`, `--save`,
`--upload-repo-id`, `--private`) call the same `Finisher` methods, so a script can do exactly
what the menu does.

Saving writes, for the chosen trial:
- `OUTPUT_DIR/model/`: the merged model (safetensors + tokenizer; by default the source
  checkpoint rewritten shard by shard, see `shard_export.py`) and/or the edited GGUF file,
  plus the model card `README.md`; this is the folder that is uploaded;
- `OUTPUT_DIR/adapter/`: the edit alone as a PEFT LoRA adapter (`--export adapter`), with its
  own card;
- `OUTPUT_DIR/heretic_metadata.json` and `OUTPUT_DIR/pareto.png` (and `residuals.png`).
Each folder is filled under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

import torch
from optuna.trial import FrozenTrial
from rich.console import Console

from heretic.abliteration import describe_params, edit_from_params, params_record
from heretic.atomic import staged_folder, write_text
from heretic.card import render_card, source_info
from heretic.config import Settings
from heretic.confirmation import figures_metadata
from heretic.edit import TrialEdit, merge_edit, restore_weights
from heretic.errors import ExportError, HereticError
from heretic.export import (
    build_metadata,
    write_adapter_files,
    write_json,
    write_model_files,
)
from heretic.judges import describe_judge
from heretic.optimization import (
    KL_ATTR,
    REFUSALS_ATTR,
    UNANSWERED_ATTR,
    completed_trials,
    finished_trials,
    objectives,
    params_from_trial,
    pareto_front,
)
from heretic.plots import TrialPoint, pareto_plot, residual_plot
from heretic.shard_edits import plan_shard_export, stored_sites
from heretic.shard_export import ShardExportUnsupported, write_edited_checkpoint
from heretic.upload import UploadResult, upload_folder

GGUF_FROM_SAFETENSORS_HINT = (
    "GGUF output needs a GGUF input (heretic then edits that file's tensors in place). For a "
    "safetensors model, save it with --export model and convert OUTPUT_DIR/model with "
    "llama.cpp's convert_hf_to_gguf.py (see docs/outputs.md, GGUF)."
)


class Finisher:
    """Everything the menu and the headless path can do once the study has trials.

    `search_more(total)` runs the study up to `total` finished trials (the CLI's search with
    its progress bar); `prompts` and `batch_size` are used for the residual picture only.
    `confirmation` (a `confirmation.Confirmation`, or None with nothing to confirm on) gives
    the held-out figures and perplexity that the metadata and the card show beside the
    search's; a trial not yet confirmed is confirmed when it is saved.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        console: Console,
        model,
        hooks,
        directions: torch.Tensor,
        evaluator,
        study,
        search_more: Callable[[int], None],
        prompts: dict[str, list[str]] | None = None,
        batch_size: int = 8,
        confirmation=None,
    ) -> None:
        self.settings = settings
        self.console = console
        self.model = model
        self.hooks = hooks
        self.directions = directions
        self.evaluator = evaluator
        self.study = study
        self.search_more = search_more
        self.prompts = prompts or {}
        self.batch_size = batch_size
        self.confirmation = confirmation
        self.saved_trial: int | None = None
        self.saved_paths: list[Path] = []
        self.benchmark_records: dict[int, dict] = {}  # trial number -> metadata "benchmarks"
        self._cards: dict[Path, tuple[list[str], bool]] = {}  # saved folder -> (formats, adapter)
        self._source = None

    # ----- the study ---------------------------------------------------------------------

    @property
    def base_refusals(self) -> int:
        return self.evaluator.base_refusals

    @property
    def n_bad(self) -> int:
        return len(self.evaluator.bad_prompts)

    def front(self) -> list[FrozenTrial]:
        return pareto_front(self.study)

    def n_finished(self) -> int:
        return len(finished_trials(self.study))

    def run_more(self, n: int) -> None:
        """Continue the same study with `n` more trials (same storage, same sampler seed
        scheme as a resumed run)."""
        if n < 1:
            raise ExportError("Run at least 1 more trial.")
        self.search_more(self.n_finished() + n)
        self.plot_pareto(self.saved_trial)

    # ----- pictures ----------------------------------------------------------------------

    def plot_pareto(self, chosen: int | None) -> Path:
        return pareto_plot(
            scored_points(self.study),
            [t.number for t in self.front()],
            chosen,
            self.base_refusals,
            self.n_bad,
            self.settings.output_dir / "pareto.png",
            title=f"heretic on {Path(self.settings.model).name}: refusals vs KL divergence",
        )

    def plot_residuals(self, trial: FrozenTrial, max_prompts: int = 128) -> Path:
        """Residuals of up to `max_prompts` good and bad direction prompts, in the layers the
        trial edits. Extracted again here (one extra pass) so the search never keeps them."""
        good = self.prompts.get("good_prompts", [])[:max_prompts]
        bad = self.prompts.get("bad_prompts", [])[:max_prompts]
        if not good or not bad:
            raise ExportError("No direction prompts to plot residuals of.")
        self.hooks.clear()
        residuals = {
            name: self.model.residuals(prompts, self.batch_size)
            for name, prompts in (("good", good), ("bad", bad))
        }
        strengths, directions = edit_from_params(params_from_trial(trial), self.directions)
        layers = sorted(
            {i for s in strengths.values() for i, w in enumerate(s.tolist()) if w != 0.0}
        )
        return residual_plot(
            residuals["good"],
            residuals["bad"],
            directions,
            layers,
            self.settings.output_dir / "residuals.png",
        )

    # ----- saving ------------------------------------------------------------------------

    def formats(self) -> list[str]:
        return self.settings.resolved_exports(gguf_input=self.model.source.gguf_file is not None)

    def _gguf_source(self) -> Path:
        source = self.model.source
        if source.gguf_file is None:
            raise ExportError(GGUF_FROM_SAFETENSORS_HINT)
        local = Path(source.path) / source.gguf_file
        if local.is_file():
            return local
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(source.path, source.gguf_file))
        except Exception as e:
            raise ExportError(
                f"Cannot find the input GGUF file {source.gguf_file} of {source.path} to copy "
                f"({e}); pass the local .gguf file as --model."
            ) from e

    def metadata(self, trial: FrozenTrial) -> dict:
        params = params_from_trial(trial)
        metadata = build_metadata(
            source_model=self.settings.model,
            trial_number=trial.number,
            best_params=params_record(params),
            kl_divergence=trial.user_attrs[KL_ATTR],
            refusal_count=trial.user_attrs[REFUSALS_ATTR],
            base_refusal_count=self.base_refusals,
            n_bad_evaluation_prompts=self.n_bad,
            n_trials=self.n_finished(),
            seed=self.settings.seed,
            settings=self.settings.model_dump(mode="json"),
        )
        metadata["refusal_direction"] = (
            "per layer"
            if params.direction_index is None
            else {"layer_index": params.direction_index}
        )
        metadata["n_good_evaluation_prompts"] = len(self.evaluator.good_prompts)
        metadata["refusal_judge"] = describe_judge(self.evaluator.judge)
        if UNANSWERED_ATTR in trial.user_attrs:  # reasoning models: among the refusals
            metadata["unanswered_count"] = trial.user_attrs[UNANSWERED_ATTR]
        metadata["exports"] = self.formats()
        metadata |= figures_metadata(self.settings, self.evaluator, self.confirmation, trial)
        if trial.number in self.benchmark_records:
            metadata["benchmarks"] = self.benchmark_records[trial.number]
        return metadata

    def save(self, trial: FrozenTrial) -> list[Path]:
        """Write the trial in every requested format, its card, metadata and pictures."""
        formats = self.formats()
        # Found before anything is written, so a missing input file fails the save cleanly.
        gguf_source = self._gguf_source() if "gguf" in formats else None
        strengths, directions = edit_from_params(params_from_trial(trial), self.directions)
        metadata = self.metadata(trial)
        source = source_info(
            self.settings.model, gguf_path=gguf_source, gguf_file=self.model.source.gguf_file
        )
        self.hooks.clear()
        written: list[Path] = []
        self._source, self._cards = source, {}
        model_formats = [f for f in formats if f in ("model", "gguf")]
        if model_formats:
            written.append(
                self._save_model(trial, model_formats, strengths, directions, gguf_source, metadata)
            )
        if "adapter" in formats:
            written.append(self._save_adapter(trial, strengths, directions, metadata))
        write_json(metadata, self.settings.output_dir / "heretic_metadata.json")
        self.saved_trial = trial.number
        self.saved_paths = written
        self.plot_pareto(trial.number)
        if self.settings.plot_residuals:
            self.console.print("Plotting residuals")
            self.plot_residuals(trial)
        return written

    def _save_model(
        self,
        trial: FrozenTrial,
        formats: list[str],
        strengths,
        directions: torch.Tensor,
        gguf_source: Path | None,
        metadata: dict,
    ) -> Path:
        """OUTPUT_DIR/model: the merged checkpoint and/or the edited GGUF file (`formats`), with
        the model card; the folder that is uploaded."""
        folder = self.settings.output_dir / "model"
        self.console.print(
            f"[bold]Saving[/] trial {trial.number} ({', '.join(formats)}) to {folder}"
        )
        with staged_folder(folder, "the model") as tmp:
            if "model" in formats:
                self._write_merged(strengths, directions, tmp)
            if "gguf" in formats:
                self._write_gguf(gguf_source, strengths, directions, tmp)
            (tmp / "README.md").write_text(self._card(metadata, formats), encoding="utf-8")
        self._cards[folder] = (formats, False)
        return folder

    def _save_adapter(
        self, trial: FrozenTrial, strengths, directions: torch.Tensor, metadata: dict
    ) -> Path:
        """OUTPUT_DIR/adapter: the edit alone as a PEFT LoRA adapter on the source model, with
        its own card."""
        folder = self.settings.output_dir / "adapter"
        self.console.print(f"[bold]Saving[/] trial {trial.number} as a LoRA adapter to {folder}")
        edit = self._trial_edit(strengths, directions)
        with staged_folder(folder, "the adapter") as tmp:
            write_adapter_files(
                self._adapter_sites(edit),
                edit,
                self._source.hub_id or self.settings.model,
                tmp,
            )
            card = self._card(metadata, ["adapter"], adapter=True)
            (tmp / "README.md").write_text(card, encoding="utf-8")
        self._cards[folder] = (["adapter"], True)
        return folder

    def _card(self, metadata: dict, formats: list[str], adapter: bool = False) -> str:
        """The model card of a saved folder; rendered again when benchmarks add to the
        metadata (`_update_saved`)."""
        return render_card(
            settings=self.settings,
            source=self._source,
            metadata=metadata,
            n_layers=self.model.n_layers,
            formats=formats,
            adapter=adapter,
        )

    def _trial_edit(self, strengths, directions: torch.Tensor) -> TrialEdit:
        return TrialEdit(
            strengths, directions, self.hooks.readouts, self.settings.row_normalization
        )

    def _write_merged(self, strengths, directions: torch.Tensor, folder: Path) -> None:
        """Shard by shard from the source checkpoint when possible (see `shard_export`), else
        merged into the loaded model and saved with save_pretrained."""
        plan = self._shard_plan(self._trial_edit(strengths, directions))
        if plan is None:
            self._write_in_memory(strengths, directions, folder)
            return
        checkpoint, edits = plan
        report = write_edited_checkpoint(
            checkpoint, edits, folder, progress=lambda line: self.console.print(f"  {line}")
        )
        if not (folder / "tokenizer_config.json").is_file():
            (self.model.processor or self.model.tokenizer).save_pretrained(folder)
        self.console.print(
            f"  safetensors: {len(report.edited)} edited tensors, {report.copied} copied "
            f"unchanged, {report.shards} shards ({report.nbytes / 1e9:.2f} GB)"
        )
        if report.files_left_out:
            self.console.print(f"  left out: {', '.join(report.files_left_out)}")

    def _shard_plan(self, edit: TrialEdit):
        """(checkpoint, edits) for the shard export, or None (with a notice) where the loaded
        model has to be saved instead."""
        if self.settings.export_method != "shards":
            return None
        source = self.model.source
        if source.gguf_file is not None:
            self.console.print("  (GGUF input: the merged model is saved from memory)")
            return None
        try:
            return plan_shard_export(source.path, self.model.sites, edit)
        except ShardExportUnsupported as e:
            self.console.print(
                f"[yellow]Shard-by-shard export is not possible: {e} Saving the loaded model "
                "with save_pretrained instead (the whole model in memory).[/]"
            )
            return None

    def _write_in_memory(self, strengths, directions: torch.Tensor, folder: Path) -> None:
        """Merge into the loaded model and save it; a model heretic loaded in 4/8 bits is
        loaded again in full precision on the CPU for this (the edit must land in the real
        weights, not in their quantized codes)."""
        edit = self._trial_edit(strengths, directions)
        if self.settings.quantization != "none":
            self.console.print(
                "  loading the model again in full precision on the CPU to merge the edit "
                "(the whole model in memory; the default export_method 'shards' avoids it)"
            )
            model = self._full_precision()
            merge_edit(model.sites, edit)
            write_model_files(model.model, model.tokenizer, folder, model.processor)
            return
        if self.model.quantization:
            raise ExportError(
                f"The model's weights are stored quantized ({', '.join(self.model.quantization)})"
                " as loaded, so the edit cannot be merged into them, and the checkpoint could not "
                "be rewritten shard by shard either: save the edit as an adapter (--export "
                "adapter), or start from the full-precision checkpoint."
            )
        originals = merge_edit(self.model.sites, edit)
        try:
            write_model_files(self.model.model, self.model.tokenizer, folder, self.model.processor)
        finally:
            restore_weights(self.model.sites, originals)

    def _full_precision(self):
        """The source model, unquantized, on the CPU, in the dtype the search computed in."""
        from heretic.loading import load_model

        settings = self.settings
        return load_model(
            settings.model,
            gguf_file=settings.gguf_file,
            dtype=str(self.model.dtype).removeprefix("torch."),
            device_map="cpu",
            trust_remote_code=settings.trust_remote_code,
            system_prompt=settings.system_prompt,
            reasoning=settings.reasoning(),
            check_logits=False,
        )

    def _adapter_sites(self, edit: TrialEdit):
        """The sites the adapter is computed from: the loaded model's (a quantized checkpoint's
        dequantized), or, for a model heretic loaded in 4/8 bits, the same sites holding the
        checkpoint's full-precision tensors."""
        if self.settings.quantization == "none":
            return self.model.sites
        try:
            return stored_sites(self.model.source.path, self.model.sites, edit)
        except ShardExportUnsupported as e:
            raise ExportError(
                f"The model is loaded quantized ({', '.join(self.model.quantization)}), so the "
                f"adapter is computed from the checkpoint's own weights, which failed: {e} Use "
                "--export model."
            ) from e

    def _write_gguf(self, source: Path, strengths, directions: torch.Tensor, folder: Path) -> None:
        import gguf

        from heretic.gguf_export import output_name, plan_edits, write_edited_gguf

        names = {t.name for t in gguf.GGUFReader(source).tensors}
        edits = plan_edits(names, self.model.sites, self._trial_edit(strengths, directions))
        report = write_edited_gguf(
            source,
            folder / output_name(source),
            edits,
            self.model.hidden_size,
            self.settings.gguf_type,
        )
        types = sorted(set(report.edited.values()))
        self.console.print(
            f"  GGUF: {len(report.edited)} edited tensors ({', '.join(types) or 'none'}), "
            f"{report.copied} copied unchanged"
        )

    # ----- upload ------------------------------------------------------------------------

    def upload(self, trial: FrozenTrial, repo_id: str, private: bool) -> UploadResult:
        """Upload the trial's saved folder (saving it first when another trial, or nothing,
        was saved); the local output stays whatever happens."""
        if self.saved_trial != trial.number or not self.saved_paths:
            self.save(trial)
        folder = self.saved_paths[0]
        self.console.print(
            f"[bold]Uploading[/] {folder} to {repo_id} ({'private' if private else 'public'})"
        )
        result = upload_folder(
            folder,
            repo_id,
            private=private,
            commit_message=f"heretic: trial {trial.number} of {Path(self.settings.model).name}",
        )
        self.console.print(f"[bold green]Uploaded[/] to {result.url}")
        return result

    # ----- chat --------------------------------------------------------------------------

    def chat(
        self,
        trial: FrozenTrial,
        read: Callable[[str], str] = input,
        out: TextIO | None = None,
        max_new_tokens: int = 512,
    ) -> list[dict[str, str]]:
        """Chat with the model as the trial edits it (hooks on, weights untouched)."""
        from heretic.chat import chat_loop

        strengths, directions = edit_from_params(params_from_trial(trial), self.directions)
        self.hooks.set_strengths(strengths, directions)
        try:
            return chat_loop(self.model, read=read, out=out, max_new_tokens=max_new_tokens)
        finally:
            self.hooks.clear()

    # ----- benchmarks --------------------------------------------------------------------

    def benchmark(self, trial: FrozenTrial, tasks: Sequence[str] | None = None) -> dict:
        """lm-eval tasks (default: the `benchmarks` setting) on the original model (cached) and
        on the trial with its edit switched on (nothing merged or saved); prints the table. The
        results go into the trial's metadata and cards, rewritten now when it is saved."""
        from heretic.capability import CACHE_FOLDER, BenchmarkOptions, Benchmarks
        from heretic.capability_report import benchmark_record, comparison_table, merge_records

        names = list(self.settings.benchmarks if tasks is None else tasks)
        benchmarks = Benchmarks(
            names,
            BenchmarkOptions.from_settings(self.settings),
            self.settings.benchmark_task_paths,
            self.settings.output_dir / CACHE_FOLDER,
            log=lambda line: self.console.print(f"  {line}", highlight=False),
        )
        strengths, directions = edit_from_params(params_from_trial(trial), self.directions)
        self.console.print(f"[bold]Benchmarking[/] trial {trial.number}: {', '.join(names)}")
        comparison = benchmarks.compare(
            self.model, lambda: self.hooks.set_strengths(strengths, directions), self.hooks.clear
        )
        title = f"Benchmarks: original model vs trial {trial.number}"
        self.console.print(comparison_table(comparison, title))
        record = merge_records(
            self.benchmark_records.get(trial.number), benchmark_record(comparison)
        )
        self.benchmark_records[trial.number] = record
        if self.saved_trial == trial.number:
            self._update_saved(trial)
        return record

    def _update_saved(self, trial: FrozenTrial) -> None:
        """Rewrite the saved trial's metadata and cards (the weights stay as they are)."""
        metadata = self.metadata(trial)
        for folder, (formats, adapter) in self._cards.items():
            write_text(
                folder / "README.md", self._card(metadata, formats, adapter), "the model card"
            )
        write_json(metadata, self.settings.output_dir / "heretic_metadata.json")
        where = ", ".join(str(f / "README.md") for f in self._cards)
        self.console.print(f"  results added to heretic_metadata.json and {where}")

    # ----- headless ----------------------------------------------------------------------

    def headless(self, trial: FrozenTrial) -> None:
        """What the flags ask for: save (unless --no-save; an upload saves too), benchmark
        (with `benchmarks` and run_benchmarks), then upload when a repo is given."""
        settings = self.settings
        if settings.save or settings.upload_repo_id:
            self.save(trial)
        else:
            self.plot_pareto(trial.number)
        if settings.benchmarks and settings.run_benchmarks:
            try:
                self.benchmark(trial)
            except HereticError as e:
                saved = ", ".join(str(p) for p in self.saved_paths)
                kept = f"; {saved} and heretic_metadata.json are complete" if saved else ""
                raise type(e)(
                    f"{e} (The study is kept{kept}; rerun with --no-run-benchmarks to skip the "
                    "benchmarks.)"
                ) from e
        if settings.upload_repo_id:
            self.upload(trial, settings.upload_repo_id, settings.private)


def trial_label(trial: FrozenTrial, n_bad: int) -> str:
    text = describe_params(params_from_trial(trial), short=True)
    kl_divergence, refusals, _ = objectives(trial)
    return (
        f"trial {trial.number:>3}: {refusals:>3}/{n_bad} refusals, KL {kl_divergence:.4f}  ({text})"
    )


def trial_choices(front: Sequence[FrozenTrial], n_bad: int) -> list[tuple[str, int]]:
    return [(trial_label(t, n_bad), t.number) for t in front]


def scored_points(study) -> list[TrialPoint]:
    """Every fully scored trial. Pruned trials are left out: their refusal counts are only
    lower bounds, so plotting them as points would misstate what they scored."""
    points = [(t.number, objectives(t)) for t in completed_trials(study)]
    return [TrialPoint(number, o.kl_divergence, o.refusals) for number, o in points]
