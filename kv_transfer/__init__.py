"""KV-cache transfer helpers for ucxkv."""
