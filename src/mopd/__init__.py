"""mopd: multi-teacher on-policy distillation, the 2026 post-training recipe declared in one YAML file."""

__version__ = "0.1.0"
