"""Model cards and figures for purified models published to the Hugging Face Hub."""

from .card import SAVE_FORMS, TAGS, build_model_card, hub_model_id, merge_evaluations
from .plots import METRICS_PLOT, SCAN_PLOT, plot_attack_metrics, plot_scan_histogram, write_plots

__all__ = [
    "SAVE_FORMS",
    "TAGS",
    "METRICS_PLOT",
    "SCAN_PLOT",
    "build_model_card",
    "hub_model_id",
    "merge_evaluations",
    "plot_attack_metrics",
    "plot_scan_histogram",
    "write_plots",
]
