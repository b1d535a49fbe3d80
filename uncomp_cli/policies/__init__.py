"""Cache policies: what the KV cache keeps. One method per module, looked up by name in ``registry``."""

from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.registry import available_methods, make_policy

__all__ = ["CachePolicy", "available_methods", "make_policy"]
