"""lora_torch."""
