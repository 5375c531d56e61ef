"""DeepSeek-V3 model in pure PyTorch (no torch.distributed)."""
import importlib

# Re-exports are resolved lazily, so that torch-free modules (model.config, model.naming) can be
# imported by the planner without pulling in torch.
_EXPORTS = {
    "ConfigError": "model.config", "ModelConfig": "model.config",
    "DeepSeekV3": "model.transformer", "LossOutput": "model.transformer",
    "enable_fp8": "model.transformer",
}
__all__ = ["ConfigError", "ModelConfig", "DeepSeekV3", "LossOutput", "enable_fp8"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
