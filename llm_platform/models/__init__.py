"""Model construction (Hugging Face architectures from config) and model arithmetic (parameters, FLOPs, memory)."""
