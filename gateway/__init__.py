"""The FastAPI gateway: JSON prompts in, Triton gRPC calls out, images back. Torch-free."""
