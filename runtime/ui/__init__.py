"""The live operator page of `runtime.stream --ui 127.0.0.1:PORT` (runtime/ui/server.py; the page
itself is static HTML/JS/CSS in runtime/ui/static, no build step, nothing fetched from elsewhere)."""
from .server import UIServer, UISink

__all__ = ["UIServer", "UISink"]
