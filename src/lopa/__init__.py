"""lopa: fast diffusion-LLM inference with Lookahead PArallel decoding."""
