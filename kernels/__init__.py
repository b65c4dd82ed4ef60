"""Ops behind one contract each (see ../shared/DESIGN.md sections 1-2).

Kernels know nothing about models: `models/` imports from here, never the reverse.
"""
from .selective_scan import selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]
