"""Local language models: model files, the llama.cpp engine, prompt formats, grammars and the tier-1 router."""
