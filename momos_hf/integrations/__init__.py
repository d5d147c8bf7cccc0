"""MoMos models in other libraries: the transformers quantizer (`quantizer`), PEFT's LoRA (`lora`), the Hub (`hub`)."""
