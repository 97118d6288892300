"""The frozen base model: its config, its checkpoint, and the Llama-family decoder."""
