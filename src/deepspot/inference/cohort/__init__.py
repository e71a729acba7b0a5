"""Cohort prediction: many slides, one task per slide, resumable, nothing lost.

A manifest (CSV: ``path``, optional ``id`` and ``mpp``) lists the slides. Every slide runs through
one function, :func:`predict_job`, which predicts it with
:func:`deepspot.inference.predict.predict_slide` (flat memory) into ``<id>.h5ad`` and
``<id>_spots.csv`` (+ ``<id>_genes.png`` when asked), written under temp names and renamed when
complete. A slide that raises is recorded as failed with its reason;
it never stops the others.

State lives in the output folder: ``_state.jsonl`` is append-only, one JSON record per finished
attempt (``done`` or ``failed`` + error), written by the driver only after the slide's outputs
were renamed into place. A rerun skips ``done`` slides whose outputs exist, retries ``failed``
ones only when asked, and removes temp files a killed run left behind. ``_summary.csv`` lists
the outcome of every slide after each run. A lock file keeps two runs out of the same folder.

``_run.json`` is the fingerprint of what produces a slide's output (sha256 of the model weights and
of its config, the encoder weights, the prediction options; each state record adds its slide's
mpp). A rerun whose fingerprint differs from the one of the slides already done is refused with
the fields that changed, unless ``new_run`` (write into a new sibling folder ``<out>-2``, ``-3``…)
or ``overwrite`` (remove the previous outputs and state, then run everything): one folder never
mixes two runs.

Backends: ``ray`` (one Ray task per slide, local Ray by default or an existing cluster via
``address``; a bounded number of tasks in flight; the model and encoder are loaded once per
worker process and reused for the slides it gets) and ``local`` (an in-process loop, same
per-slide function and state handling).

Rooms: ``manifest`` (reading it), ``folder`` (the output folder's files and owner), ``lock``, ``leftovers``
(what a killed run left), ``state`` (per-slide records and the summary), ``work`` (the per-slide
prediction), ``fingerprint`` (``_run.json``), ``runners`` (local, Ray) and ``run`` (:func:`run_cohort`).
"""
from __future__ import annotations

from deepspot.inference.cohort.fingerprint import (fingerprint_changes, new_run_dir, run_fingerprint,
                                                   write_run_file)
from deepspot.inference.cohort.folder import (LOCK_FILE, RUN_FILE, STATE_FILE, SUMMARY_FILE, adopt_legacy,
                                              check_output_dir, clear_previous, cohort_folder, output_paths)
from deepspot.inference.cohort.leftovers import remove_partials
from deepspot.inference.cohort.lock import folder_lock
from deepspot.inference.cohort.manifest import SlideJob, read_cohort
from deepspot.inference.cohort.run import CohortSummary, run_cohort
from deepspot.inference.cohort.state import CohortState, SlideResult, plan, write_summary
from deepspot.inference.cohort.work import PredictOptions, SlidePredictor, predict_job, resolve_device
