#!/usr/bin/env python3
"""Docker HEALTHCHECK for the edge-ad images (stdlib only; exit 0 healthy, 1 unhealthy).

Checks, in order, the first that is configured:
  EDGE_AD_HEALTH_URL  an HTTP URL that must answer 200 (runtime.serve: Triton's
                      http://127.0.0.1:8000/v2/health/ready);
  EDGE_AD_HEARTBEAT   a file the running process touches; unhealthy when older than
                      EDGE_AD_HEARTBEAT_MAX_AGE seconds (default 30);
  otherwise           the toolkit and its inference runtime import (the environment is sound).
"""
from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def check_url(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (local URL)
            return resp.status == 200, f"{url}: HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {getattr(e, 'reason', e)}"


def check_heartbeat(path: str, max_age_s: float) -> tuple[bool, str]:
    try:
        age = time.time() - os.stat(path).st_mtime
    except OSError as e:
        return False, f"heartbeat {path}: {e.strerror}"
    return age <= max_age_s, f"heartbeat {path}: {age:.1f} s old (max {max_age_s:g} s)"


def check_imports() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
        import runtime  # noqa: F401
    except Exception as e:  # any import failure makes the container unusable
        return False, f"import failed: {type(e).__name__}: {e}"
    return True, "runtime and onnxruntime import"


def check(env=None) -> tuple[bool, str]:
    env = os.environ if env is None else env
    if env.get("EDGE_AD_HEALTH_URL"):
        return check_url(env["EDGE_AD_HEALTH_URL"])
    if env.get("EDGE_AD_HEARTBEAT"):
        try:
            max_age = float(env.get("EDGE_AD_HEARTBEAT_MAX_AGE", "30"))
        except ValueError:
            return False, "EDGE_AD_HEARTBEAT_MAX_AGE must be a number of seconds"
        return check_heartbeat(env["EDGE_AD_HEARTBEAT"], max_age)
    return check_imports()


def main() -> int:
    ok, why = check()
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
