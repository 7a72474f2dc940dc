"""Look at the data before trusting it: leaks, duplicates, likely wrong labels, outliers, odd files.

Everything here works on a :class:`finetune.data.ScanReport` and the pooled backbone features of its
images (the features the head sees, from the cached-feature path: :class:`finetune.tools.features.FeatureCache`
keyed exactly as ``CachedHeadSteps`` keys its evaluation-transform banks, so a second doctor run, or
a head-only finetune given the same cache folder, reuses them). Nothing here prints or writes into the
user's folder; :func:`write_findings_csv` writes where it is told.

Findings, most serious first (``FINDING_ORDER``):

* ``leak``: the same image (same bytes, features with cosine similarity >= ``near_threshold``, or
  16x16 colour pixel fingerprints with cosine >= ``pixel_threshold``: re-encoded / resized copies) in two
  splits. ``path`` is the copy on the training side (train before val before test: the one
  ``zoo finetune --exclude`` can drop), ``other`` the copy in the later split.
* ``cross_class_duplicate`` / ``duplicate``: the same image twice in one split, in two classes / one class.
  ``path`` is the second copy (sorted order), ``other`` the first.
* ``wrong_label``: out-of-fold predictions of a linear probe (softmax regression, full-batch L-BFGS,
  ``folds`` stratified folds, seeded, its L2 strength chosen by its held-out loss) over every labelled image;
  confident learning's C+NR flags (``labels.confident_flags``): the confident joint (each image counted under
  its most probable class among those at or over their threshold ``t_j``, the mean out-of-fold probability of
  class ``j`` over the images labelled ``j``), calibrated, estimates how many images labelled ``i`` are ``j``; an
  image is flagged when it is among its class's least probable images (prune by class), among the largest
  margins ``p_j - p_i`` of a pair the joint counts (prune by noise rate), and a class that may be suggested is
  more probable than its label. Score: ``p_j - p_given``; ``other``: the suggested class (the most probable
  other one).
* ``outlier``: far from every class centroid: robust z-score of ``1 - max_c cos(f, centroid_c)`` above
  ``outlier_z`` (median / MAD over the folder).
* ``tiny`` (shorter side < ``min_side`` px), ``aspect`` (long / short side > ``max_aspect``),
  ``small_class`` (fewer training images than ``small_class_ratio`` x the median class),
  ``unreadable`` and ``scan_warning`` (what the scan already reported).

The parts: ``findings`` (the options, the rows, findings.csv and the exclude list), ``checks`` (duplicates,
outliers, file sizes), ``labels`` (the label probe and confident learning's
flags) and ``run`` (the folder's features and :func:`run_doctor`).
"""
from __future__ import annotations

from finetune.tools.doctor.checks import file_facts, file_findings, find_duplicates, find_outliers, pixel_fingerprint
from finetune.tools.doctor.findings import (CSV_COLUMNS, EXCLUDE_KINDS, FINDING_ORDER, DoctorOptions, DoctorResult,
                                      Excluded, Finding, exclude_items, exclude_list_text, read_exclude_file,
                                      write_findings_csv)
from finetune.tools.doctor.labels import label_issues
from finetune.tools.doctor.run import folder_features, run_doctor

__all__ = [
    "DoctorOptions", "Finding", "DoctorResult", "FINDING_ORDER", "CSV_COLUMNS", "EXCLUDE_KINDS",
    "file_facts", "pixel_fingerprint", "folder_features", "find_duplicates", "label_issues", "find_outliers",
    "file_findings",
    "run_doctor", "write_findings_csv", "read_exclude_file", "exclude_list_text", "exclude_items", "Excluded",
]
