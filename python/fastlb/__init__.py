"""fastlb: an L4/L7 load balancer with a Rust data plane and a Python control plane."""

from fastlb._native import HashRing, Maglev, NativeError
from fastlb._native import __version__ as __version__
from fastlb.config import Config, ConfigError, load_config
from fastlb.engine import Engine

__all__ = [
    "Config",
    "ConfigError",
    "Engine",
    "HashRing",
    "Maglev",
    "NativeError",
    "__version__",
    "load_config",
]
