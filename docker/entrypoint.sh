#!/usr/bin/env bash
# Container entry point: record the platform's power/clock state (Jetson: nvpmodel and
# jetson_clocks; any host: CPU/GPU frequencies from sysfs) so every log and benchmark of this
# container says what it ran under, then exec the command (default: python -m runtime.stream).
set -euo pipefail

log="${EDGE_AD_PLATFORM_LOG:-/tmp/edge-ad-platform.txt}"
{
  echo "edge-ad container start: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "image: l4t=${EDGE_AD_L4T:-n/a} jetpack=${EDGE_AD_JETPACK:-n/a} cuda=${EDGE_AD_CUDA:-n/a} tensorrt=${EDGE_AD_TENSORRT:-n/a}"
  if [ -r /etc/nv_tegra_release ]; then
    echo "nv_tegra_release: $(head -n 1 /etc/nv_tegra_release)"
  fi
  # Both tools need the host's /etc/nvpmodel.conf and privileges; absent or failing, say so.
  if command -v nvpmodel >/dev/null 2>&1; then
    echo "nvpmodel -q: $(nvpmodel -q 2>&1 | tr '\n' ' ')"
  else
    echo "nvpmodel: not available in this container (query it on the host: sudo nvpmodel -q)"
  fi
  if command -v jetson_clocks >/dev/null 2>&1; then
    echo "jetson_clocks --show:"
    jetson_clocks --show 2>&1 | sed 's/^/  /' || true
  fi
  for f in /sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq /sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq; do
    [ -r "$f" ] && echo "$f: $(cat "$f")"
  done
  for f in /sys/class/devfreq/*/cur_freq; do
    [ -r "$f" ] && echo "$f: $(cat "$f")"
  done
} >"$log" 2>&1 || true
cat "$log" >&2 || true

exec "$@"
