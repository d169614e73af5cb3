"""fastlb: an L4/L7 load balancer with a Rust data plane and a Python control plane."""

from fastlb._native import HashRing, Maglev, NativeError
from fastlb.config import Config, ConfigError, load_config
from fastlb.engine import Engine

__all__ = ["Config", "ConfigError", "Engine", "HashRing", "Maglev", "NativeError", "load_config"]
__version__ = "0.1.0"
