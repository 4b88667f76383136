"""B'MOJO: hybrid state-space language models with eidetic and fading memory (Zancato et al., NeurIPS 2024)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_bmojo import PRESETS, BMojoConfig, preset_config
from .modeling_bmojo import BMojoCache, BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel

__version__ = "0.1.0"

# Make "bmojo" a model type the Auto classes know, as soon as the package is imported.
AutoConfig.register("bmojo", BMojoConfig, exist_ok=True)
AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "BMojoCache",
    "BMojoConfig",
    "BMojoForCausalLM",
    "BMojoModel",
    "BMojoPreTrainedModel",
    "preset_config",
]
