"""Offline fake of the OpenAI Realtime WebSocket server (beta and GA), for tests, benchmarks and demos.

`model` is the server as a sans-I/O state machine (with switchable quirks of real servers); `server` is the
aiohttp wire around it.
"""

from proxy.simulator.model import QUIRKS, Model, ModelConfig
from proxy.simulator.server import SimSession, Simulator, SimulatorConfig, serve_forever

__all__ = ["QUIRKS", "Model", "ModelConfig", "SimSession", "Simulator", "SimulatorConfig", "serve_forever"]
