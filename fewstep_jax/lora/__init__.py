"""LoRA students: adapters on any of the project's Linen models (adapters.py, by qwix), their
files in the peft / kohya layouts diffusers loads (files.py), and the pipelines' denoisers as
LoRA students with their exports (denoisers.py). docs/guides/lora.md."""
