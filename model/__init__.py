"""DeepSeek-V3 model in pure PyTorch (no torch.distributed)."""
from model.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
