"""DeepSeek-V3 model in pure PyTorch (no torch.distributed)."""
from model.config import ConfigError, ModelConfig
from model.transformer import DeepSeekV3, LossOutput, enable_fp8, set_recompute

__all__ = ["ConfigError", "ModelConfig", "DeepSeekV3", "LossOutput", "enable_fp8", "set_recompute"]
