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
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
