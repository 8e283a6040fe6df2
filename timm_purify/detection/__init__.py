"""Find out whether a model is safe to load (static file inspection) and whether it carries a
backdoor (BAN-style behavioural scan, with universal reach as a second stage)."""

from .ban import ScanOptionError, load_calibration, scan
from .reach import ReachResult, universal_reach
from .report import ScanReport
from .static import Finding, UnsafeFileError, assert_safe, inspect_files

__all__ = [
    "Finding",
    "ReachResult",
    "ScanOptionError",
    "ScanReport",
    "UnsafeFileError",
    "assert_safe",
    "inspect_files",
    "load_calibration",
    "scan",
    "universal_reach",
]
