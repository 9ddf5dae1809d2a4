"""4-bit quantised frozen bases (QLoRA): NF4/FP4 in bitsandbytes' exact format, a 4-bit linear layer."""

from .model import (bnb_quantization_config, dequantize_model, load_pretrained_4bit, load_quantized,
                    prepare_model_for_kbit_training, quantize, save_pretrained_4bit)
from .nf4 import (QuantState4bit, code_4bit, dequantize_4bit, dynamic_code, quantize_4bit, state_from_dict,
                  state_to_dict)

__all__ = ["QuantState4bit", "code_4bit", "dynamic_code", "quantize_4bit", "dequantize_4bit", "state_to_dict",
           "state_from_dict", "quantize",
           "prepare_model_for_kbit_training", "dequantize_model", "save_pretrained_4bit", "load_pretrained_4bit",
           "load_quantized",
           "bnb_quantization_config"]
