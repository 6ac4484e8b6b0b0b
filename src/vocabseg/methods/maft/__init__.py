"""MAFT: the IP-CLIP encoder, mask-aware fine-tuning and proposal classification (spec part A)."""
