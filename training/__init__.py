"""MiniGPT-Pancreas training: dataset preparation, the cascaded LoRA fine-tune, evaluation and export."""
