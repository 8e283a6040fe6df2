"""Find out whether a model is safe to load and whether it carries a backdoor."""

from .static import Finding, UnsafeFileError, assert_safe, inspect_files

__all__ = ["Finding", "UnsafeFileError", "assert_safe", "inspect_files"]
