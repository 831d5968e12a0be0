"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) and its checkpoint: `spec` (config and files,
torch-free), `weights` (safetensors loading), `rope`, `llama` (the decoder)."""
