"""Find out whether a model is safe to load (static file inspection) and whether it carries a
backdoor (BAN-style behavioural scan, with universal reach and spread, over the whole image or
window by window, as later stages)."""

from .ban import ScanOptionError, load_calibration, scan
from .reach import (
    ReachResult,
    SpreadResult,
    WindowSpreadResult,
    universal_reach,
    universal_spread,
    window_spread,
)
from .report import ScanReport
from .static import Finding, UnsafeFileError, assert_safe, inspect_files

__all__ = [
    "Finding",
    "ReachResult",
    "ScanOptionError",
    "ScanReport",
    "SpreadResult",
    "UnsafeFileError",
    "WindowSpreadResult",
    "assert_safe",
    "inspect_files",
    "load_calibration",
    "scan",
    "universal_reach",
    "universal_spread",
    "window_spread",
]
