"""Every fault issue 12 lists, by class, and the tests of this folder that inject it.

``pytest tests/reliability`` ends with a table built from this registry and the outcome of each matched test
(``conftest.pytest_terminal_summary``): per class, how many listed cases have a passing test, how many a failing
one, how many none. A case counts as handled only when at least one of its tests passed and none failed; a pattern
that matches no test that ran leaves its case uncovered (so a renamed test shows up, it is never counted silently).

Patterns are node ids relative to ``tests/reliability/``; a pattern matches the tests whose id starts with it (all
parameters of a test, or the parameters whose id starts with the given prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASSES", "Case", "CASES", "EXTRA"]

#: the issue's classes, in its order, with the outcome a failing case means
CLASSES: dict[str, str] = {
    "data lost": "data lost",
    "code execution": "code executed",
    "silently wrong": "silently wrong",
    "raw traceback": "raw tracebacks / misleading messages",
}


@dataclass(frozen=True)
class Case:
    """One fault the issue lists: its class, what the issue reported, and the tests that inject it."""

    key: str
    kind: str
    reported: str
    tests: tuple[str, ...]


_DL, _CL, _SE, _IN = "test_data_loss.py::", "test_clear_errors.py::", "test_silent_errors.py::", "test_disk_full.py::"
_UC, _WO, _CR = "test_unreadable_case.py::", "test_weights_only.py::", "test_crash_resume.py::"
_DICOM_SLICE = f"{_SE}test_dicom_slice_that_cannot_be_read_is_named_never_dropped"
_INFER_INPUT = f"{_SE}test_inference_refuses_inputs_it_would_get_wrong"
_SPACING = f"{_SE}test_check_dataset_flags_undefined_or_implausible_spacing"
_BAD_CKPT = f"{_WO}test_bad_checkpoint_is_a_clear_error_and_never_runs_code"
_UNWRITABLE = f"{_CL}test_unwritable_output_is_one_clear_line"
_GUARD = f"{_DL}test_training_refuses_to_start_over_an_earlier_run"

CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- data lost or overwritten
    Case("D1", "data lost", "inferring with --output_dir inside --input_dir overwrote an input CT",
         (f"{_DL}test_inference_refuses_output_folders_that_could_lose_data", f"{_DL}test_label_writer_never_replaces_a_file_it_did_not_write",
          f"{_DL}test_rerun_into_own_output_folder_and_partial_run_are_allowed", f"{_DL}test_inference_skips_the_label_files_of_a_dataset_layout")),
    Case("D2", "data lost", "datalist --out DIR/dataset.json or a CT replaced it by JSON",
         (f"{_DL}test_datalist_never_replaces_what_it_did_not_write[dataset.json]", f"{_DL}test_datalist_never_replaces_what_it_did_not_write[case_00000/imaging.nii.gz",
          f"{_DL}test_datalist_replaces_its_own_earlier_output")),
    Case("D3", "data lost", "re-training into an output_dir replaced best.pt/last.pt",
         (f"{_GUARD}[earlier_run", f"{_GUARD}[both_knobs", f"{_GUARD}[truncated_last", f"{_DL}test_overwrite_and_resume_are_explicit",
          f"{_DL}test_training_bundle_refuses_an_earlier_run_before_any_work[earlier_run]", f"{_DL}test_overwrite_never_keeps_the_earlier_runs_best_checkpoint")),
    Case("D4", "data lost", "two trainings in one output_dir: MLflow race, the other run's split (leakage)",
         (f"{_DL}test_second_run_into_a_locked_output_dir_is_refused", f"{_DL}test_training_bundle_refuses_a_folder_another_run_holds", f"{_DL}test_split_is_written_once_and_a_resumed_run_keeps_it")),
    # ---------------------------------------------------------------- code execution
    Case("C1", "code execution", "--checkpoint / resume loaded with weights_only=False ran a crafted payload",
         (f"{_BAD_CKPT}[", f"{_DL}test_written_checkpoints_are_plain_and_load_weights_only", f"{_WO}test_good_checkpoint_still_loads")),
    # ---------------------------------------------------------------- silently wrong (exit 0)
    Case("S1", "silently wrong", "check_dataset passed pixdim 0", (f"{_SPACING}[pixdim_zero_no_sform]", f"{_SPACING}[zero_length_axis]")),
    Case("S2", "silently wrong", "check_dataset passed a negative pixdim", (f"{_SPACING}[pixdim_negative_no_sform]",)),
    Case("S3", "silently wrong", "check_dataset passed 0.1 x 0.1 x 50 mm volumes", (f"{_SPACING}[anisotropic_0.1x0.1x50]",)),
    Case("S4", "silently wrong", "dicom_to_nifti dropped an unreadable slice at the series edge",
         (f"{_DICOM_SLICE}[header_truncated-edge]", f"{_DICOM_SLICE}[meta_truncated-edge]", f"{_DICOM_SLICE}[pixels_truncated-edge]", f"{_SE}test_dicom_slice_without_read_permission_is_named")),
    Case("S5", "silently wrong", "dicom_to_nifti reported an unreadable mid-series slice as a gap",
         (f"{_DICOM_SLICE}[header_truncated-middle]", f"{_DICOM_SLICE}[meta_truncated-middle]", f"{_DICOM_SLICE}[pixels_truncated-middle]")),
    Case("S6", "silently wrong", "a single-slice series got 1 mm z-spacing, SliceThickness ignored", (f"{_SE}test_single_slice_series_uses_slice_thickness_and_warns",)),
    Case("S7", "silently wrong", "inferring a zero-spacing input reported volumes from an invented 1 mm spacing",
         (f"{_INFER_INPUT}[pixdim_zero_no_sform]", f"{_INFER_INPUT}[zero_length_axis]")),
    Case("S8", "silently wrong", "inferring a 2D NIfTI gave a (1,32,32) output", (f"{_INFER_INPUT}[2d]",)),
    # ---------------------------------------------------------------- raw tracebacks or misleading messages
    Case("R1", "raw traceback", "datalist: unreadable case folders (PermissionError)", (f"{_DL}test_datalist_unreadable_case_folder_is_a_clear_error",)),
    Case("R2", "raw traceback", "datalist --out an existing folder (IsADirectoryError, stray tmp file)",
         (f"{_DL}test_datalist_never_replaces_what_it_did_not_write[case_00000]", f"{_DL}test_datalist_never_replaces_what_it_did_not_write[.]")),
    Case("R3", "raw traceback", "dicom_to_nifti: output is a file", (f"{_CL}test_dicom_output_that_is_a_file_is_a_clear_error",)),
    Case("R4", "raw traceback", "dicom_to_nifti: unwritable output", (f"{_UNWRITABLE}[dicom_to_nifti]",)),
    Case("R5", "raw traceback", "dicom_to_nifti: full disk", (f"{_IN}test_dicom_to_nifti_on_a_full_disk",)),
    Case("R6", "raw traceback", "synthesize on a full disk: partial case folders, no dataset.json",
         (f"{_IN}test_synthesize_on_a_full_disk_leaves_nothing_partial", f"{_IN}test_synthesize_write_error_without_a_small_disk")),
    Case("R7", "raw traceback", "a teacher for other input channels: conv RuntimeError, MLflow run left RUNNING",
         (f"{_CL}test_teacher_for_other_input_channels_is_refused_in_preflight", f"{_CL}test_bundle_error_shows_the_projects_message_first")),
    Case("R8", "raw traceback", "--in_plane_size null: invalid literal for int()", (f"{_CL}test_in_plane_size_null_means_keep",)),
    Case("R9", "raw traceback", "unwritable output_dir",
         (f"{_UNWRITABLE}[training_new_folder]", f"{_UNWRITABLE}[training_existing_folder]", f"{_UNWRITABLE}[inference]", f"{_UNWRITABLE}[datalist]", f"{_UNWRITABLE}[synthesize]", f"{_GUARD}[output_dir_is_a_file")),
    Case("R10", "raw traceback", "a truncated case with --check_data false: EOFError inside LoadImaged",
         (f"{_UC}test_unreadable_case_while_caching", f"{_UC}test_unreadable_case_at_the_first_iteration", f"{_CR}test_crash_during_training_marks_the_mlflow_run_failed",
          f"{_UC}test_a_bug_in_a_transform_is_not_reported_as_an_unreadable_file")),
    Case("R11", "raw traceback", "an unreachable --tracking_uri failed after preflight, 264 s of retries", (f"{_CL}test_tracking_store_is_checked_in_preflight[unreachable_server]",)),
    Case("R12", "raw traceback", "a corrupt mlruns.db", (f"{_CL}test_tracking_store_is_checked_in_preflight[corrupt_sqlite]",)),
    Case("R13", "raw traceback", "a full disk during training: iostream error, no last.pt, tmp files, MLflow RUNNING",
         (f"{_IN}test_preflight_refuses_an_output_dir_without_room_for_the_checkpoints", f"{_IN}test_checkpoint_write_on_a_full_disk_keeps_the_previous_one")),
    Case("R14", "raw traceback", "a truncated checkpoint for inference", (f"{_BAD_CKPT}[load_checkpoint-truncated]", f"{_BAD_CKPT}[network_from_checkpoint-truncated]")),
    Case("R15", "raw traceback", "a fake .nii.gz among inference inputs: partial outputs, no volumes.csv, 0-byte tmp file", (f"{_INFER_INPUT}[fake_nifti]",)),
    Case("R16", "raw traceback", "the 4D-input message named no file", (f"{_INFER_INPUT}[4d]",)),
    Case("R17", "raw traceback", "the truncated-pixel message named no file",
         (f"{_DICOM_SLICE}[pixels_truncated", f"{_UC}test_inference_input_whose_voxels_are_missing")),
    Case("R18", "raw traceback", "the --series error printed the full SeriesInstanceUID", (f"{_CL}test_series_listing_shows_hashes_not_uids",)),
    Case("R19", "raw traceback", "--resume without last.pt reported only after caching",
         (f"{_GUARD}[nothing_to_resume", f"{_DL}test_training_bundle_refuses_an_earlier_run_before_any_work[resume_without_last_pt]")),
    Case("R20", "raw traceback", "bundle errors wrapped in MONAI's 'Failed to evaluate ConfigExpression' traceback",
         (f"{_CL}test_excepthook_prints_the_projects_message_first", f"{_CL}test_bundle_error_shows_the_projects_message_first")),
)  # fmt: skip

#: deliverables of the issue that are not a listed fault (reported beside the table, not counted in it)
EXTRA: tuple[Case, ...] = (
    Case("K1", "deliverable", "SIGKILL during training and during a checkpoint write, then --resume true", (f"{_CR}test_sigkill_then_resume_continues_the_same_mlflow_run",)),
    Case("K2", "deliverable", "every temp file removed when a write fails", (f"{_DL}test_failed_write_leaves_no_temp_file_and_keeps_the_old_file", f"{_IN}test_remove_new_files_on_error_keeps_what_existed")),
)  # fmt: skip
