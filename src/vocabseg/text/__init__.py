"""The text side: class lists with synonyms, prompt templates, and the cached text classifier."""
