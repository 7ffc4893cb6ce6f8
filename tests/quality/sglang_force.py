"""Teacher forcing through SGLang's sampler, for the quality suite's SGLang
route (imported by SGLang's scheduler process: keep it free of suite imports).

SGLang returns logprobs of prompt tokens (prefill) and of the tokens it
samples, but it cannot score a given continuation one decode step at a time:
its logprobs are taken after custom logit processors run. So this processor
does both jobs at each sampling step of a request: it records the NLL of the
step's target token and the argmax under the model's own logits (float32
log-softmax), then forces the target (every other logit -inf), so the next
decode step is fed the teacher's token. Step 0 is scored by the last prefill
row; every later step by a single-token decode forward (the decode path of
the attention backend), exactly like ihip_run's decode-scored tokens.

custom_params: {"targets": [ids], "out": path}. One JSON line per step is
appended to `out`: {"step", "target", "nll", "argmax", "t"} (t: time.time()).
"""
import json
import math
import time

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class ForceTargets(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        for i, p in enumerate(custom_param_list or []):
            if not p or "targets" not in p:
                continue
            step = len(p["__req__"].output_ids)  # overlap schedule off: output_ids is current
            targets = p["targets"]
            if step >= len(targets):
                raise RuntimeError(f"teacher forcing: step {step} past {len(targets)} targets")
            t = int(targets[step])
            row = logits[i].float()
            nll = -float(torch.log_softmax(row, -1)[t])
            rec = {"step": step, "target": t, "nll": nll, "argmax": int(row.argmax()), "t": time.time()}
            with open(p["out"], "a") as f:
                f.write(json.dumps(rec) + "\n")
            logits[i] = -math.inf
            logits[i, t] = 0.0
        return logits
