"""Evaluation as the daemon will see it: predictors (torch, OpenVINO IR, emulated FP16), the
operating point (thresholds + opening) with the one calibration, scores, and the run report."""
