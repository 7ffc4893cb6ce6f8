"""Train Locret retaining heads for a Hugging Face causal LM (PyTorch).

    python -m infinitehip.locret_train --model DIR --text FILE [FILE ..] \
        --out heads/my-model.h64

Recipe (arXiv 2410.01805; upstream huangyuxiang03/Locret locret/train/):

- The model is frozen; one head per layer, fc2(silu(fc1(x))) with no bias,
  x = cat(q_proj(h), k_proj(h), v_proj(h)) of each token before RoPE.
- Target ("causal importance score"): each training sequence is split into
  a prefix and a response (its last `--response` tokens). A prefix key's
  target is its largest pre-softmax logit q.k/sqrt(d) (post-RoPE, as the
  model attends) over all response queries and over the query heads of its
  GQA group: one value per (layer, KV head, prefix token).
- Loss: SmoothL1 (beta 1) to the targets, averaged over tokens, KV heads and
  layers, plus 0.0025 x sum over layers of the MSE between adjacent tokens'
  predictions. AdamW (lr 5e-4, betas 0.9/0.95), linear warm-up then linear
  decay, gradients clipped by value at 0.5.

Differences from upstream, all for a small budget: the heads are trained
apart from the model (the model runs once per sequence under no_grad and
the heads take `--inner-steps` steps on its projections; identical
gradients since the model is frozen); `--hidden` defaults to 64 (upstream
1024); the warm-up is `--warmup` of the steps (upstream 2000 of 3000); the
text is plain long text cut into `--seq-len` windows (upstream: LongAlpaca
prompts up to 10240 tokens).

Output: `OUT.safetensors` with upstream's tensor names
(`model.layers.{l}.self_attn.fc1.weight` [hidden, (n_q + 2 n_kv) head_dim],
`fc2.weight` [n_kv, hidden]), the layout libinfinitehip's loader checks, and
`OUT.json` saying how they were trained, with held-out rank quality of the
trained heads against untrained (random) heads of the same shape.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

SMOOTH_WEIGHT = 0.0025


def fc1_name(layer):
    return f"model.layers.{layer}.self_attn.fc1.weight"


def fc2_name(layer):
    return f"model.layers.{layer}.self_attn.fc2.weight"


def read_text(path):
    """A file's text: .jsonl lines joined by their "text" field, else raw."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return "\n".join(json.loads(line)["text"] for line in f if line.strip())
        return f.read()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def windows(ids, seq_len, count, seed):
    """`count` non-overlapping windows of `seq_len` tokens, in a seeded
    random order (the whole text is cut first, so windows never repeat)."""
    import torch

    n = len(ids) // seq_len
    if n < count:
        raise SystemExit(f"text holds {n} windows of {seq_len} tokens, need {count}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)[:count].tolist()
    t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return [t[i] for i in order]


class Shape:
    """The attention shape the heads must match, read from the model config."""

    def __init__(self, config):
        self.n_layers = config.num_hidden_layers
        self.n_q = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_q
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // self.n_q
        )
        self.input = (self.n_q + 2 * self.n_kv) * self.head_dim

    def as_dict(self):
        return {
            "n_layers": self.n_layers,
            "n_q_heads": self.n_q,
            "n_kv_heads": self.n_kv,
            "head_dim": self.head_dim,
        }


class Collector:
    """Runs the frozen model on one sequence and returns, per layer, the
    heads' inputs over the prefix and the targets."""

    def __init__(self, model, shape):
        import torch

        self.model = model
        self.shape = shape
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = self.base.layers
        # The rotary helper of the model's own modeling file (Llama, Qwen2,
        # Mistral, ... all define it next to their attention class).
        attn_mod = sys.modules[type(self.layers[0].self_attn).__module__]
        self.apply_rope = attn_mod.apply_rotary_pos_emb
        self.proj = {}
        self.hooks = []
        for l, layer in enumerate(self.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                mod = getattr(layer.self_attn, name)
                self.hooks.append(mod.register_forward_hook(self._hook(l, name)))
        self.torch = torch

    def _hook(self, layer, name):
        def save(_mod, _inp, out):
            self.proj[(layer, name)] = out.detach()

        return save

    def __call__(self, ids, response):
        """ids [T] -> (x [L, P, input] f32, target [L, n_kv, P] f32) with
        P = T - response."""
        torch, s = self.torch, self.shape
        dev = next(self.model.parameters()).device
        ids = ids.to(dev)[None]
        T = ids.shape[1]
        P = T - response
        self.proj.clear()
        with torch.no_grad():
            self.base(input_ids=ids, use_cache=False)
            pos = torch.arange(T, device=dev)[None]
            emb = self.base.embed_tokens(ids)
            cos, sin = self.base.rotary_emb(emb, pos)
            xs, ts = [], []
            for l in range(s.n_layers):
                q = self.proj[(l, "q_proj")][0]
                k = self.proj[(l, "k_proj")][0]
                v = self.proj[(l, "v_proj")][0]
                xs.append(torch.cat([q[:P], k[:P], v[:P]], dim=-1).float())
                # [1, heads, T, d] as the modeling file's rotary helper wants.
                qh = q.view(T, s.n_q, s.head_dim).transpose(0, 1)[None]
                kh = k.view(T, s.n_kv, s.head_dim).transpose(0, 1)[None]
                qr, kr = self.apply_rope(qh, kh, cos, sin)
                qr = qr[0, :, P:].float()  # response queries [n_q, R, d]
                kr = kr[0, :, :P].float()  # prefix keys [n_kv, P, d]
                g = s.n_q // s.n_kv
                logits = torch.einsum(
                    "kgrd,kpd->kgrp", qr.view(s.n_kv, g, response, s.head_dim), kr
                ) / math.sqrt(s.head_dim)
                ts.append(logits.amax(dim=(1, 2)))
        x, t = torch.stack(xs), torch.stack(ts)
        if not (torch.isfinite(x).all() and torch.isfinite(t).all()):
            raise ValueError("non-finite head inputs or targets (a token without an embedding row?)")
        return x, t

    def close(self):
        for h in self.hooks:
            h.remove()


class FileHeads:
    """Heads read from a safetensors file (upstream names), first n_layers
    layers, evaluated like `Heads` (for --compare)."""

    def __init__(self, path, n_layers, device):
        import torch
        from safetensors.torch import load_file

        w = load_file(path)
        self.w1 = torch.stack([w[fc1_name(l)] for l in range(n_layers)]).float().to(device)
        self.w2 = torch.stack([w[fc2_name(l)] for l in range(n_layers)]).float().to(device)

    def __call__(self, x):
        return Heads.__call__(self, x)


class Heads:
    """All layers' heads as two stacked parameters: w1 [L, hidden, input],
    w2 [L, n_kv, hidden], initialised as torch.nn.Linear initialises."""

    def __init__(self, shape, hidden, seed, device):
        import torch

        g = torch.Generator().manual_seed(seed)
        b1, b2 = 1 / math.sqrt(shape.input), 1 / math.sqrt(hidden)
        w1 = (torch.rand(shape.n_layers, hidden, shape.input, generator=g) * 2 - 1) * b1
        w2 = (torch.rand(shape.n_layers, shape.n_kv, hidden, generator=g) * 2 - 1) * b2
        self.w1 = w1.to(device).requires_grad_()
        self.w2 = w2.to(device).requires_grad_()
        self.shape, self.hidden = shape, hidden

    def params(self):
        return [self.w1, self.w2]

    def __call__(self, x):
        """x [L, P, input] -> scores [L, n_kv, P]."""
        import torch

        h = torch.nn.functional.silu(torch.einsum("lpi,lhi->lph", x, self.w1))
        return torch.einsum("lph,lkh->lkp", h, self.w2)

    def state_dict(self, dtype):
        out = {}
        for l in range(self.shape.n_layers):
            out[fc1_name(l)] = self.w1[l].detach().to("cpu", dtype).contiguous()
            out[fc2_name(l)] = self.w2[l].detach().to("cpu", dtype).contiguous()
        return out


def loss_fn(pred, target):
    """Upstream's loss: SmoothL1 averaged over (layer, head, token) plus
    0.0025 x sum over layers of the adjacent-token MSE."""
    import torch

    fit = torch.nn.functional.smooth_l1_loss(pred, target, beta=1.0)
    smooth = ((pred[..., 1:] - pred[..., :-1]) ** 2).mean(dim=(1, 2)).sum()
    return fit + SMOOTH_WEIGHT * smooth, fit


def zscore(a, dim=-1):
    """(a - mean) / std along dim (std 0 -> 1)."""
    mu = a.mean(dim, keepdim=True)
    sd = a.std(dim, keepdim=True, unbiased=False)
    return (a - mu) / sd.clamp_min(1e-6)


def rank_term(kind, pred, target, beta):
    """A listwise ranking loss that weights the top of the ranking (what an
    eviction to 1/8 keeps), KL(softmax(beta z(target)) || softmax(beta .)):

    - `col`: per (layer, KV head) column over the prefix tokens, the
      prediction divided by the target column's std (a constant), so the
      term ranks without changing the scale SmoothL1 fits;
    - `tok`: per token, the way llama.cpp pools a token's scores by default
      (`z_max`: z-score each column over the tokens, then the token's max)
      against the target's raw max over columns (the pooling with which the
      exact targets did best, tests/quality/locret_sim.py oracle-logit);
    - `tokraw`: the same with the predictions pooled raw (`raw_max`), so
      the heads learn one scale across layers."""
    import torch

    if kind == "col":
        sd = target.std(-1, keepdim=True, unbiased=False).clamp_min(1e-6)
        p = torch.softmax(beta * zscore(target), -1)
        logq = torch.log_softmax(beta * pred / sd, -1)
    elif kind in ("tok", "tokraw"):
        L, H, P = target.shape
        s_t = target.reshape(L * H, P).amax(0)
        s_p = pred.reshape(L * H, P)
        s_p = (s_p if kind == "tokraw" else zscore(s_p)).amax(0)
        p = torch.softmax(beta * zscore(s_t), -1)
        logq = torch.log_softmax(beta * zscore(s_p), -1)
    else:
        raise ValueError(kind)
    return (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1).mean()


def variant_loss(v, pred, target):
    """loss, SmoothL1 fit for a variant dict (keys loss, rank_weight, beta)."""
    loss, fit = loss_fn(pred, target)
    if v["loss"] != "fit":
        loss = loss + v["rank_weight"] * rank_term(v["loss"], pred, target, v["beta"])
    return loss, fit


def rank_quality(pred, target, frac=8):
    """Mean over (layer, KV head) of the Spearman correlation between
    predicted and target scores, and of the overlap of their top 1/frac."""
    import torch

    def ranks(a):
        return a.argsort(dim=-1).argsort(dim=-1).float()

    rp, rt = ranks(pred), ranks(target)
    rp = rp - rp.mean(-1, keepdim=True)
    rt = rt - rt.mean(-1, keepdim=True)
    rho = (rp * rt).sum(-1) / (rp.norm(dim=-1) * rt.norm(dim=-1))
    k = max(1, pred.shape[-1] // frac)
    tp = pred.topk(k, dim=-1).indices
    tt = target.topk(k, dim=-1).indices
    hit = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, tt, True)
    overlap = hit.gather(-1, tp).float().mean(-1)
    return rho.mean().item(), overlap.mean().item()


def evaluate(heads, data):
    import torch

    rows = []
    with torch.no_grad():
        for x, t in data:
            pred = heads(x)
            L, H, P = t.shape
            # token level: llama.cpp's default pooling (z_max) of the
            # predictions against the targets' raw max over columns
            tok = rank_quality(zscore(pred.reshape(L * H, P)).amax(0)[None], t.reshape(L * H, P).amax(0)[None])
            rows.append((*rank_quality(pred, t), loss_fn(pred, t)[1].item(), tok[1]))
    n = max(1, len(rows))
    return {
        "spearman": sum(r[0] for r in rows) / n,
        "top_eighth_overlap": sum(r[1] for r in rows) / n,
        "smooth_l1": sum(r[2] for r in rows) / n,
        "token_top_eighth_overlap_zmax": sum(r[3] for r in rows) / n,
    }


def pack_info(model_dir):
    """What `locret_pack` recorded when the checkpoint came from a pack."""
    p = os.path.join(model_dir, "locret_pack.json")
    return json.load(open(p)) if os.path.exists(p) else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m infinitehip.locret_train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+",
                     help="training text: .txt files, or .jsonl with a 'text' field per line")
    src.add_argument("--tokens", help="training token ids, a .npy (as locret_pack unpack writes)")
    p.add_argument("--out", required=True, help="output prefix (.safetensors and .json added)")
    p.add_argument("--hidden", type=int, default=64, help="head hidden width (upstream 1024)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--response", type=int, default=256,
                   help="last tokens of a sequence whose queries define the targets")
    p.add_argument("--sequences", type=int, default=64, help="training sequences")
    p.add_argument("--holdout", type=int, default=4, help="held-out sequences for evaluation")
    p.add_argument("--inner-steps", type=int, default=4,
                   help="optimizer steps on each sequence's projections")
    p.add_argument("--epochs", type=int, default=1, help="passes over the sequences")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--save-dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=8)
    p.add_argument("--compare", help="also evaluate this heads file (same widths) on the held-out sequences")
    p.add_argument("--loss", default="fit", choices=["fit", "col", "tok", "tokraw"],
                   help="fit: upstream's SmoothL1 + smoothness; col / tok: plus a listwise ranking term "
                        "per (layer, KV head) column / per token (see rank_term)")
    p.add_argument("--rank-weight", type=float, default=1.0, help="weight of the ranking term")
    p.add_argument("--beta", type=float, default=1.0, help="sharpness of the ranking term's softmax")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value,..: train several heads on the same model forwards (keys: hidden, "
                        "loss, rank_weight, beta, epochs, lr, seed); each writes OUT-NAME.{safetensors,json}. "
                        "Implies --cache-features")
    p.add_argument("--init", help="start from this heads file (same hidden width) instead of a seeded init")
    p.add_argument("--cache-features", action="store_true",
                   help="run the model once per training sequence and keep its projections and targets "
                        "on the device for every epoch and variant (~L x seq_len x input x 4 bytes a sequence)")
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the cached projections are kept in (float16 halves the memory, e.g. on a "
                        "CPU; the heads still train in float32 on the values as rounded)")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds after start after which no further variant is started (0: none)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    mdt = args.model_dtype
    if mdt == "auto":
        mdt = "bfloat16" if dev.startswith("cuda") else "float32"
    if args.response >= args.seq_len:
        raise SystemExit("--response must be below --seq-len")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, mdt))
    model.to(dev).eval().requires_grad_(False)
    shape = Shape(model.config)
    if shape.n_q % shape.n_kv:
        raise SystemExit(f"{shape.n_q} query heads do not group over {shape.n_kv} KV heads")

    if args.tokens:
        import numpy as np

        ids = np.load(args.tokens).astype(np.int64).tolist()
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        text = "\n\n".join(read_text(p) for p in args.text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    seqs = windows(ids, args.seq_len, args.sequences + args.holdout, args.seed)
    train, held = seqs[: args.sequences], seqs[args.sequences:]
    collect = Collector(model, shape)
    t_setup = time.time() - t0

    held_data = [collect(s, args.response) for s in held]
    t_model = 0.0
    if args.cache_features or args.variant:
        tm = time.time()
        cdt = getattr(torch, args.cache_dtype)
        cached = [(x.to(cdt), t) for x, t in (collect(s, args.response) for s in train)]
        t_model = time.time() - tm
        print(json.dumps({"cached_sequences": len(cached), "seconds": round(t_model, 1)}), flush=True)
    else:
        cached = None

    base = {"hidden": args.hidden, "loss": args.loss, "rank_weight": args.rank_weight, "beta": args.beta,
            "epochs": args.epochs, "lr": args.lr, "seed": args.seed}
    variants = [(None, dict(base))] if not args.variant else [parse_variant(v, base) for v in args.variant]
    infos = []
    for name, v in variants:
        if args.deadline and time.time() - t0 > args.deadline:
            print(json.dumps({"variant": name, "skipped": "deadline"}), flush=True)
            continue
        out = args.out if name is None else f"{args.out}-{name}"
        infos.append(train_variant(args, argv, v, name, out, shape, dev, mdt, ids, train, held_data, cached,
                                   collect, t0, t_setup, t_model))
    collect.close()
    return infos[0] if len(infos) == 1 else infos


def parse_variant(spec, base):
    """NAME:key=value,.. -> (NAME, settings)."""
    name, _, rest = spec.partition(":")
    v = dict(base)
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition("=")
        if k not in v:
            raise SystemExit(f"--variant {spec}: unknown key {k}")
        v[k] = type(base[k])(val)
    return name, v


def train_variant(args, argv, v, name, out, shape, dev, mdt, ids, train, held_data, cached, collect, t0,
                  t_setup, t_model):
    import torch
    from safetensors.torch import save_file

    tv = time.time()
    torch.manual_seed(v["seed"])
    heads = Heads(shape, v["hidden"], v["seed"], dev)
    untrained = evaluate(heads, held_data)
    init = None
    if args.init:
        init = FileHeads(args.init, shape.n_layers, dev)
        if init.w1.shape != heads.w1.shape:
            raise SystemExit(f"--init {args.init}: {tuple(init.w1.shape)}, not {tuple(heads.w1.shape)}")
        with torch.no_grad():
            heads.w1.copy_(init.w1)
            heads.w2.copy_(init.w2)
        init = {"path": os.path.abspath(args.init), "sha256": sha256(args.init), **evaluate(heads, held_data)}
    steps = len(train) * v["epochs"] * args.inner_steps
    opt = torch.optim.AdamW(heads.params(), lr=v["lr"], betas=(0.9, 0.95))
    warm = max(1, int(args.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    step, log = 0, []
    t_train = time.time()
    for epoch in range(v["epochs"]):
        for i, seq in enumerate(train):
            if cached is not None:
                x, target = cached[i]
                x = x.float()
            else:
                tm = time.time()
                x, target = collect(seq, args.response)
                t_model += time.time() - tm
            for _ in range(args.inner_steps):
                opt.zero_grad(set_to_none=True)
                loss, fit = variant_loss(v, heads(x), target)
                loss.backward()
                torch.nn.utils.clip_grad_value_(heads.params(), 0.5)
                opt.step()
                sched.step()
                step += 1
            if (i + 1) % args.log_every == 0 or i + 1 == len(train):
                row = {"variant": name, "epoch": epoch, "sequence": i + 1, "step": step,
                       "loss": loss.item(), "smooth_l1": fit.item(),
                       "seconds": round(time.time() - t0, 1)}
                log.append(row)
                print(json.dumps(row), flush=True)
    t_train = time.time() - t_train
    trained = evaluate(heads, held_data)
    compare = evaluate(FileHeads(args.compare, shape.n_layers, dev), held_data) if args.compare else None

    out_st, out_js = out + ".safetensors", out + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(out_st)), exist_ok=True)
    save_file(heads.state_dict(getattr(torch, args.save_dtype)), out_st,
              metadata={"format": "pt", "locret_hidden": str(v["hidden"])})
    info = {
        "what": "Locret retaining heads (infinitehip.locret_train)",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "variant": name,
        "model": os.path.abspath(args.model),
        "model_config": shape.as_dict(),
        "hidden": v["hidden"],
        "activation": "silu",
        "tensor_dtype": args.save_dtype,
        "loss": {"kind": v["loss"], "rank_weight": v["rank_weight"], "beta": v["beta"],
                 "smooth_weight": SMOOTH_WEIGHT},
        "text": [{"path": os.path.abspath(p), "sha256": sha256(p)} for p in args.text or []],
        "tokens": {"path": os.path.abspath(args.tokens), "sha256": sha256(args.tokens)}
        if args.tokens else None,
        "model_pack": pack_info(args.model),
        "text_tokens": len(ids),
        "seq_len": args.seq_len,
        "response": args.response,
        "train_sequences": len(train),
        "holdout_sequences": len(held_data),
        "epochs": v["epochs"],
        "inner_steps": args.inner_steps,
        "optimizer_steps": step,
        "lr": v["lr"],
        "warmup_steps": warm,
        "seed": v["seed"],
        "features_cached": cached is not None,
        "cache_dtype": args.cache_dtype if cached is not None else None,
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(dev),
        "model_dtype": mdt,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "torch": torch.__version__,
        "seconds": {"setup": round(t_setup, 1), "train": round(t_train, 1),
                    "model_forward": round(t_model, 1), "variant": round(time.time() - tv, 1),
                    "total": round(time.time() - t0, 1)},
        "init": init,
        "heldout": {"trained": trained, "untrained_random": untrained,
                    **({"compare": {"path": os.path.abspath(args.compare), **compare}} if compare else {})},
        "log": log,
    }
    with open(out_js, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps({"out": out_st, "heldout": info["heldout"], "seconds": info["seconds"]}), flush=True)
    return info


if __name__ == "__main__":
    main()
