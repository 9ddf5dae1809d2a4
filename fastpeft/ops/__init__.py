"""The public functional API: one op per hot path, each a torch.library custom op with autograd,
a fake kernel for torch.compile, a plain-PyTorch reference, and backend dispatch."""

from .bottleneck import bottleneck_adapter
from .grouped_lora import grouped_lora_linear, plan_groups
from .ia3 import ia3_linear
from .lora import lora_linear
from .prefix_attention import prefix_attention
from .soft_prompt import soft_prompt_embed

__all__ = ["bottleneck_adapter", "lora_linear", "ia3_linear", "prefix_attention", "soft_prompt_embed", "grouped_lora_linear", "plan_groups"]
