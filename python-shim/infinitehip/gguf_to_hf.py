"""Convert a GGUF model to a Hugging Face checkpoint directory (dequantized,
f32) with transformers' own GGUF loader, for `infinitehip.locret_train`.

    python -m infinitehip.gguf_to_hf MODEL.gguf OUT_DIR

Needs transformers, gguf and accelerate. The weights are the GGUF's values
dequantized, so heads trained on the result match the model llama.cpp runs.
"""

import argparse
import os


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infinitehip.gguf_to_hf", description=__doc__.split("\n")[0])
    p.add_argument("gguf")
    p.add_argument("out")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    os.makedirs(args.out, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF ("quantized with gguf"),
    # though its weights are plain dequantized tensors: write them directly.
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(args.out, "model.safetensors"),
              metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights written are dequantized
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
