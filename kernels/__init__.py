"""Ops behind one contract each (docs/design.md sections 2-3).

Kernels know nothing about models: `models/` imports from here, never the reverse.
"""
from .cross_scan import cross_merge, cross_scan, inverse_orders, scan_orders
from .lowering import export_mode, get_cpu_kernel, get_export_mode, set_cpu_kernel, set_export_mode
from .moe import moe_gate, moe_gate_ref
from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref", "scan_orders", "inverse_orders",
           "cross_scan", "cross_merge", "moe_gate", "moe_gate_ref", "export_mode",
           "set_export_mode", "get_export_mode", "set_cpu_kernel", "get_cpu_kernel"]
