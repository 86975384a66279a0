"""The accelerate training loops (tokenizer; later the prior) and what they share."""
