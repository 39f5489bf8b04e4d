"""Every fault of issue 19's second probe, by class, and the tests of this folder that inject it.

Counted as issue 12's registry is (``conftest.pytest_terminal_summary``, ``conftest.case_outcome``): a fault is handled
only when one of its tests passed and none failed; a fault none of whose tests ran counts against the outcome.
Patterns are node ids relative to ``tests/reliability/``, matched by prefix.
The inference-input faults (NaN / non-HU / 1e30 voxels, label maps by name and content, a corrected label map never
overwritten) are injected by ``test_inference_inputs.py`` (issue 17's guards).
"""

from __future__ import annotations

from tests.reliability.issue12_cases import Case

__all__ = ["CLASSES", "CASES", "EXTRA"]

#: the issue's classes, in its order, with the outcome a failing case means
CLASSES: dict[str, str] = {
    "code execution": "code executed",
    "data lost": "data lost or leaked",
    "identifier leak": "identifier leaks",
    "silently wrong": "silently wrong",
    "raw traceback": "raw tracebacks / misleading messages",
}

_CE, _SI, _IL = "test_code_execution.py::", "test_split_integrity.py::", "test_identifier_leaks.py::"
_SW, _OL, _II = "test_silently_wrong.py::", "test_one_line_errors.py::", "test_inference_inputs.py::"
_DF = "test_disk_full.py::"
_KNOB = f"{_OL}test_bad_knob_values_are_one_line_naming_the_knob"
_CLI = f"{_OL}test_bundle_command_line_bad_knob_is_one_error_line"

CASES: tuple[Case, ...] = (
    # ---------------------------------------------------------------- code execution
    Case("C1", "code execution", "experiment --resume ran the $-expression data_dir of experiment.json; --dataset_dir @kits read as a reference",
         (f"{_CE}test_experiment_resume_never_runs_the_data_dir_of_experiment_json", f"{_CE}test_config_literal_reads_back_as_exactly_the_string",
          f"{_CE}test_bundle_command_line_path_that_reads_as_config_syntax_is_refused", f"{_CE}test_relative_dataset_dir_at_kits_is_a_clear_error_not_a_reference")),
    # ---------------------------------------------------------------- data lost or leaked between splits
    Case("D1", "data lost", "datalist CSV split Test/testing: held-out cases into training, empty test list",
         (f"{_SI}test_datalist_csv_split_aliases_keep_held_out_cases_out_of_training", f"{_SI}test_datalist_unknown_csv_split_value_names_it_and_the_valid_ones")),
    Case("D2", "data lost", "datalist re-run replaced a split file the user edited by hand", (f"{_SI}test_datalist_refuses_to_replace_a_split_file_edited_by_hand",)),
    Case("D3", "data lost", "a .lock symlink in output_dir: the user's file overwritten with the pid",
         (f"{_SI}test_training_output_dir_with_symlinks_never_writes_through_them", f"{_SI}test_atomic_writes_never_replace_a_symlink")),
    Case("D4", "data lost", "evaluation after cases were added: a training case evaluated as test", (f"{_SI}test_evaluation_after_cases_were_added_never_scores_a_training_case",)),
    Case("D5", "data lost", "inference re-run overwrote a corrected label map", (f"{_II}test_rerun_overwrites_only_an_unchanged_prediction",)),
    Case("D6", "data lost", "synthesize --out an existing dataset overwrote real cases", (f"{_SI}test_synthesize_refuses_a_non_empty_folder_it_did_not_create",)),
    # ---------------------------------------------------------------- identifier leaks
    Case("L1", "identifier leak", "dicom_to_nifti put the SeriesDescription into the file name and the log", (f"{_IL}test_dicom_to_nifti_names_and_logs_carry_no_free_text_field",)),
    Case("L2", "identifier leak", "DICOM inference put the SeriesDescription into the case id / volumes.csv", (f"{_IL}test_dicom_inference_case_ids_carry_no_free_text_field",)),
    # ---------------------------------------------------------------- silently wrong (exit 0)
    Case("S1", "silently wrong", "a NaN voxel with --check_data false: NaN best.pt logged as the model",
         (f"{_SW}test_nan_loss_stops_at_the_first_batch_naming_its_cases_before_the_weights_change", f"{_SW}test_training_on_a_nan_voxel_exits_non_zero_and_saves_no_nan_model")),
    Case("S2", "silently wrong", "no tumor anywhere: tumor DSC 1.0 (empty vs empty) selected the checkpoint", (f"{_SW}test_empty_vs_empty_tumor_dsc_is_undefined_and_never_selects_a_checkpoint",)),
    Case("S3", "silently wrong", "inference on NaN, non-HU (0..1905) or 1e30 volumes without a warning",
         (f"{_II}test_nan_voxels_are_refused", f"{_II}test_inf_voxels_are_refused", f"{_II}test_unsigned_volume_without_rescale_is_not_hu", f"{_II}test_1e30_voxels_are_refused")),
    Case("S4", "silently wrong", "inference segmented *_mask/*_seg/*_label label maps as CT",
         (f"{_II}test_label_map_by_name", f"{_II}test_label_map_in_labelsTr_folder_is_refused", f"{_II}test_label_map_by_content")),
    Case("S5", "silently wrong", "evaluation of patXX/ct.nii.gz: one prediction file, three rows named ct", (f"{_SW}test_evaluation_files_sharing_a_name_get_unique_case_ids_and_prediction_files",)),
    Case("S6", "silently wrong", "a student checkpoint evaluated with the teacher's evaluate.yaml, tracked as the teacher", (f"{_OL}test_evaluating_a_checkpoint_with_another_roles_config_is_refused",)),
    Case("S7", "silently wrong", "check_dataset: imaging.nii next to imaging.nii.gz, one picked silently", (f"{_SW}test_check_dataset_refuses_imaging_nii_next_to_imaging_nii_gz",)),
    Case("S8", "silently wrong", "check_dataset: 1e30 voxels passed", (f"{_SW}test_check_dataset_flags_1e30_voxels",)),
    Case("S9", "silently wrong", "--run_tags mlflow.parentRunId of a run that does not exist accepted", (f"{_OL}test_parent_run_that_does_not_exist_is_refused",)),
    Case("S10", "silently wrong", "polyp: a mask of another size resized independently", (f"{_SW}test_polyp_mask_of_another_size_is_an_error_naming_both",)),
    # ---------------------------------------------------------------- raw tracebacks or misleading messages
    Case("R1", "raw traceback", "RGB NIfTI in check_dataset (numpy UFunc error)", (f"{_OL}test_rgb_nifti_is_a_clear_error_in_check_dataset",)),
    Case("R2", "raw traceback", "--epochs abc", (f"{_KNOB}[epochs_abc]", f"{_CLI}[epochs-abc]")),
    Case("R3", "raw traceback", "--seed abc", (f"{_KNOB}[seed_abc]",)),
    Case("R4", "raw traceback", "--lr -0.001", (f"{_KNOB}[lr_negative]", f"{_CLI}[lr--0.001]")),
    Case("R5", "raw traceback", "--val_interval 0", (f"{_KNOB}[val_interval_0]",)),
    Case("R6", "raw traceback", "--network_kwargs \"{'foo': 1}\"", (f"{_KNOB}[network_kwargs_foo]", f"{_CLI}[network_kwargs-")),
    Case("R7", "raw traceback", "malformed --run_tags", (f"{_KNOB}[run_tags_set]", f"{_KNOB}[run_tags_text]")),
    Case("R8", "raw traceback", "an ftp:// tracking URI", (f"{_KNOB}[tracking_ftp]", f"{_CLI}[tracking_uri-")),
    Case("R9", "raw traceback", "--dataset_dir pointing at a file: 'does not exist'", (f"{_OL}test_dataset_dir_that_is_a_file_says_so", f"{_OL}test_dataset_dir_file_in_resolve_splits_says_file_and_a_csv_is_read")),
    Case("R10", "raw traceback", "--teacher_ckpt of a student: 'no taps for role pred_mid', file not named", (f"{_OL}test_teacher_checkpoint_of_a_student_names_the_file",)),
    Case("R11", "raw traceback", "--batch_size 1 --samples_per_volume 1: BatchNorm error", (f"{_KNOB}[batch_norm_single_crop]",)),
    Case("R12", "raw traceback", "--resume with other --network_kwargs: state_dict size mismatch", (f"{_OL}test_resume_with_other_network_kwargs_is_one_line_before_long_work",)),
    Case("R13", "raw traceback", "label value 3 declared in dataset.json: index out of bounds at training", (f"{_OL}test_label_value_beyond_the_networks_classes_is_refused_in_preflight",)),
    Case("R14", "raw traceback", "a splits JSON with paths relative to itself resolved against the working directory", (f"{_SI}test_splits_json_paths_are_relative_to_the_json_not_the_working_directory",)),
    Case("R15", "raw traceback", "MLflow store on a read-only disk (raw OSError / sqlalchemy)", (f"{_OL}test_mlflow_store_on_a_read_only_disk_is_one_line",)),
    Case("R16", "raw traceback", "polyp grayscale or truncated JPEG (transform traceback)", (f"{_OL}test_polyp_grayscale_image_is_read_as_rgb_and_truncated_jpeg_is_one_line",)),
    Case("R17", "raw traceback", "datalist CSV header 'image, label' (misleading)", (f"{_SI}test_datalist_csv_header_with_spaces_is_read",)),
    Case("R18", "raw traceback", "datalist --seed -1 (numpy message)", (f"{_SI}test_datalist_negative_seed_names_the_knob",)),
    Case("R19", "raw traceback", "dicom_to_nifti with PixelSpacing 0 (LinAlgError)", (f"{_OL}test_dicom_pixel_spacing_zero_is_one_line_naming_the_series",)),
    Case("R20", "raw traceback", "experiment with a NaN voxel: right text, printed as a traceback", (f"{_OL}test_experiment_with_a_nan_voxel_prints_the_error_not_a_traceback",)),
    Case("R21", "raw traceback", "MLflow store on a full disk (sqlalchemy 'database or disk is full' after caching)", (f"{_DF}test_mlflow_store_on_a_full_disk_is_one_line_before_training",)),
)  # fmt: skip

#: checks of the issue that are not a listed fault (reported beside the table, not counted in it)
EXTRA: tuple[Case, ...] = (
    Case("K1", "deliverable", "a finite loss still trains (the NaN guard changes nothing else)", (f"{_SW}test_finite_loss_trains_as_before",)),
    Case("K2", "deliverable", "good knob values pass the knob check", (f"{_OL}test_good_knob_values_pass",)),
)  # fmt: skip
