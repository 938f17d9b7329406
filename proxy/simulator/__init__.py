"""Offline fake of the OpenAI Realtime WebSocket server (beta and GA), for tests, benchmarks and demos."""

from proxy.simulator.server import SimSession, Simulator, SimulatorConfig, serve_forever

__all__ = ["SimSession", "Simulator", "SimulatorConfig", "serve_forever"]
