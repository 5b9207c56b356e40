"""Export: GGUF files for llama.cpp and the Ollama Modelfile beside them."""
