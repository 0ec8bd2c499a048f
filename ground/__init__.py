"""The ground model factory: teachers, students, distillation, pruning, FP16-aware
fine-tuning, OpenVINO export and uplink bundles."""
