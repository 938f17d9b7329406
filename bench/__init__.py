"""Benchmarks: the proxy beside a direct connection and nginx, on loopback. Run with ``python -m bench``.

Process layout (each its own process, so each one's CPU is its own):

    bench (client load, orchestration) ──▶ proxy (python -m proxy)  ──▶ upstream (echo + Simulator)
                                       ──▶ nginx (when installed)   ──▶ upstream
                                       ──────────────────────────────▶ upstream          ("direct")
"""
