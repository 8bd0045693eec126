"""Interoperability with other ecosystems: Hugging Face Llama export and import (`smelt.interop.hf`)."""
