"""Hugging Face interop: Mixtral config and tensor mapping (mixtral.py), safetensors directories
(files.py), and the export-hf / import-hf commands (convert.py). Needs `safetensors` (`moemesh[hf]`);
transformers itself is not imported."""
