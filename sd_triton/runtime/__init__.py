"""Code the Triton python models run: tokenizer, scheduler loop, postprocess, ONNX Runtime runner."""
