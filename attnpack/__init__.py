"""attnpack: sparse and structured attention for Hugging Face diffusers pipelines.

import attnpack
handle = attnpack.apply(pipe, "dense")      # a method by name, with its settings as keywords
handle.remove()                             # the exact original processors back

attnpack.attach(pipe)                       # or install processors yourself, after attach
pipe.transformer.set_attn_processor(attnpack.DenseAttention())
attnpack.remove(pipe)                       # everything out again
"""

from importlib.metadata import PackageNotFoundError, version

from .api import Handle, apply, attach, remove
from .context import AttentionSite, AttnContext
from .layout import Role, TokenLayout
from .methods import (
    METHODS,
    AgentAttention,
    AttentionMethod,
    ClearAttention,
    DenseAttention,
    FreeLongAttention,
    FreeNoiseAttention,
    IsolationAttention,
    PooledAgentAttention,
    RadialAttention,
    Subject,
    TrajectoryRoPE,
    register_method,
)
from .parallel import context_parallel_plan

try:
    __version__ = version("attnpack")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "METHODS",
    "AgentAttention",
    "AttentionMethod",
    "AttentionSite",
    "AttnContext",
    "ClearAttention",
    "DenseAttention",
    "FreeLongAttention",
    "FreeNoiseAttention",
    "Handle",
    "IsolationAttention",
    "PooledAgentAttention",
    "RadialAttention",
    "Role",
    "Subject",
    "TokenLayout",
    "TrajectoryRoPE",
    "__version__",
    "apply",
    "attach",
    "context_parallel_plan",
    "register_method",
    "remove",
]
