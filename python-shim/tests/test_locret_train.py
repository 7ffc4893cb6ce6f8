"""infinitehip.locret_train on a tiny random Llama (CPU, seconds): the head
inputs and targets against an f64 numpy forward written from the Llama
equations, a short training run whose heads beat their random init, and the
written file read by libinfinitehip, whose eviction keeps exactly the tokens
the trained heads score highest."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file  # noqa: E402

from infinitehip import locret_train  # noqa: E402

NL, NQ, NKV, D, HID, VOCAB = 2, 4, 2, 16, 48, 97


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HID, intermediate_size=80, num_hidden_layers=NL,
        num_attention_heads=NQ, num_key_value_heads=NKV, head_dim=D,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    # Larger weights than the init so attention logits spread (targets vary).
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(d / "model")
    ids = np.random.default_rng(1).integers(0, VOCAB, 4000)
    np.save(d / "tokens.npy", ids)
    return d


def reference(model_dir, ids, response):
    """f64 Llama forward from the safetensors: (x [L, P, in], target [L, NKV, P])."""
    w = {k: v.double().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    cfg = json.load(open(model_dir / "config.json"))
    eps = cfg["rms_norm_eps"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    T, P = len(ids), len(ids) - response
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.outer(np.arange(T), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x):  # [heads, T, D], rotate_half convention
        half = np.concatenate([-x[..., D // 2:], x[..., : D // 2]], -1)
        return x * cos + half * sin

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    h = w["model.embed_tokens.weight"][ids]
    xs, ts = [], []
    for l in range(NL):
        p = f"model.layers.{l}."
        a = norm(h, w[p + "input_layernorm.weight"])
        q, k, v = (a @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        xs.append(np.concatenate([q, k, v], 1)[:P])
        qr = rope(q.reshape(T, NQ, D).transpose(1, 0, 2))
        kr = rope(k.reshape(T, NKV, D).transpose(1, 0, 2))
        vh = v.reshape(T, NKV, D).transpose(1, 0, 2)
        g = NQ // NKV
        logits = np.einsum("htd,hsd->hts", qr, np.repeat(kr, g, 0)) / math.sqrt(D)
        ts.append(logits[:, P:, :P].reshape(NKV, g * response, P).max(1))
        logits = logits + np.triu(np.full((T, T), -np.inf), 1)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hts,hsd->thd", pr, np.repeat(vh, g, 0)).reshape(T, NQ * D)
        h = h + o @ w[p + "self_attn.o_proj.weight"].T
        m = norm(h, w[p + "post_attention_layernorm.weight"])
        gate = m @ w[p + "mlp.gate_proj.weight"].T
        up = m @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return np.stack(xs), np.stack(ts)


def test_inputs_and_targets_match_f64_reference(tiny):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()
    shape = locret_train.Shape(model.config)
    col = locret_train.Collector(model, shape)
    ids = np.load(tiny / "tokens.npy")[:72]
    x, t = col(torch.tensor(ids), 24)
    col.close()
    rx, rt = reference(tiny / "model", ids, 24)
    assert x.shape == (NL, 48, (NQ + 2 * NKV) * D) and t.shape == (NL, NKV, 48)
    assert t.std() > 0.5, "targets must vary for the test to mean anything"
    for got, want in ((x.numpy(), rx), (t.numpy(), rt)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert np.isfinite(got).all() and err < 1e-5, err
    # A target is a max over the response queries: without the last one,
    # no target grows and some shrink.
    _, rt2 = reference(tiny / "model", ids[:71], 23)
    assert (rt2 <= rt + 1e-12).all() and np.abs(rt2 - rt).max() > 1e-3


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "tiny.h8"
    info = locret_train.main([
        "--model", str(tiny / "model"), "--tokens", str(tiny / "tokens.npy"),
        "--out", str(out), "--hidden", "8", "--seq-len", "96", "--response", "32",
        "--sequences", "8", "--holdout", "2", "--inner-steps", "8", "--epochs", "3",
        "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--save-dtype", "float32",
    ])
    return out, info


def test_training_writes_upstream_names_and_beats_random(trained):
    out, info = trained
    st = load_file(str(out) + ".safetensors")
    want = {}
    for l in range(NL):
        want[f"model.layers.{l}.self_attn.fc1.weight"] = (8, (NQ + 2 * NKV) * D)
        want[f"model.layers.{l}.self_attn.fc2.weight"] = (NKV, 8)
    assert {k: tuple(v.shape) for k, v in st.items()} == want
    assert all(torch.isfinite(v).all() for v in st.values())
    js = json.load(open(str(out) + ".json"))
    assert js["hidden"] == 8 and js["optimizer_steps"] == 8 * 3 * 8
    assert js["model_config"] == {"n_layers": NL, "n_q_heads": NQ, "n_kv_heads": NKV, "head_dim": D}
    tr, rnd = js["heldout"]["trained"], js["heldout"]["untrained_random"]
    print(js["heldout"], js["seconds"])
    assert tr["smooth_l1"] < 0.5 * rnd["smooth_l1"], js["heldout"]
    assert tr["spearman"] > rnd["spearman"] + 0.2, js["heldout"]


def test_libinfinitehip_evicts_what_the_trained_heads_rank_lowest(trained):
    from infinitehip import Engine, InfinitehipError

    out, _ = trained
    path = str(out) + ".safetensors"
    n, budget = 40, 12
    cfg = {
        "model": {"n_layers": NL, "n_q_heads": NQ, "n_kv_heads": NKV, "head_dim": D},
        "kv": {"page_size": 16, "dtype": "f32"},
        "dense_layers": 1,
        "default": {"method": "locret", "weights": path, "hidden": 8, "budget": budget,
                    "chunk": n, "stabilizer": 0, "sink": 0, "keep_last": 0},
    }
    with pytest.raises(InfinitehipError, match="fc1"):
        Engine({**cfg, "default": {**cfg["default"], "hidden": 16}})
    rng = np.random.default_rng(7)
    pq = rng.standard_normal((n + 1, NQ * D)).astype(np.float32)
    pk, pv = (rng.standard_normal((n + 1, NKV * D)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((n + 1, NKV, D)).astype(np.float32) for _ in range(2))
    eng = Engine(cfg)
    eng.add_sequence(1)
    eng.append(1, 1, k[:n], v[:n], proj=(pq[:n], pk[:n], pv[:n]))
    # The eviction owed for the prefill chunk runs before the decode token joins.
    eng.append(1, 1, k[n:], v[n:], phase="decode", proj=(pq[n:], pk[n:], pv[n:]))
    assert eng.seq_len(1, 1) == budget + 1
    st = load_file(path)
    w1, w2 = st["model.layers.1.self_attn.fc1.weight"], st["model.layers.1.self_attn.fc2.weight"]
    x = torch.from_numpy(np.concatenate([pq, pk, pv], 1)[:n])
    score = (torch.nn.functional.silu(x @ w1.T) @ w2.T).numpy()  # [n, NKV]
    q = rng.standard_normal((1, NQ, D)).astype(np.float32)
    got = eng.attend_decode(1, [1], q)
    for h in range(NQ):
        kv = h // (NQ // NKV)
        keep = np.sort(np.argsort(-score[:, kv])[:budget])
        gap = np.sort(score[:, kv])[::-1]
        assert gap[budget - 1] - gap[budget] > 1e-4, "near-tie at the budget: pick another seed"
        rows = np.append(keep, n)
        lg = k[rows, kv].astype(np.float64) @ q[0, h] / math.sqrt(D)
        p = np.exp(lg - lg.max())
        want = (p / p.sum()) @ v[rows, kv]
        # Keeping the budget's worst token in place of its best must differ.
        wrong = np.append(np.sort(np.argsort(-score[:, kv])[1 : budget + 1]), n)
        lw = k[wrong, kv].astype(np.float64) @ q[0, h] / math.sqrt(D)
        pw = np.exp(lw - lw.max())
        assert np.abs((pw / pw.sum()) @ v[wrong, kv] - want).max() > 1e-3
        assert np.abs(got[0, h] - want).max() < 1e-5, h


def test_compare_evaluates_another_heads_file(trained, tiny, tmp_path):
    """--compare on the file the run itself wrote (float32) gives the trained
    heads' held-out numbers; on a different file, different ones."""
    out, info = trained
    path = str(out) + ".safetensors"
    args = ["--model", str(tiny / "model"), "--tokens", str(tiny / "tokens.npy"),
            "--hidden", "8", "--seq-len", "96", "--response", "32",
            "--sequences", "8", "--holdout", "2", "--inner-steps", "8", "--epochs", "3",
            "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--save-dtype", "float32"]
    again = locret_train.main(args + ["--out", str(tmp_path / "again"), "--compare", path])
    ho = again["heldout"]
    # Same seed, same data: the rerun trains the same heads (CPU, one thread).
    for k in ("spearman", "top_eighth_overlap", "smooth_l1"):
        assert abs(ho["compare"][k] - info["heldout"]["trained"][k]) < 1e-5, (k, ho)
        assert abs(ho["compare"][k] - ho["trained"][k]) < 1e-5, (k, ho)
    st = load_file(path)
    st = {k: (v if "fc2" not in k else -v) for k, v in st.items()}
    from safetensors.torch import save_file

    neg = str(tmp_path / "neg.safetensors")
    save_file(st, neg)
    other = locret_train.main(args + ["--epochs", "1", "--out", str(tmp_path / "o"), "--compare", neg])
    assert other["heldout"]["compare"]["spearman"] < -0.2, other["heldout"]


def test_pack_merge_takes_new_layers_and_keeps_the_rest(tmp_path):
    from safetensors.torch import save_file

    from infinitehip import locret_pack

    def heads(n_layers, hidden, fill):
        out = {}
        for l in range(n_layers):
            out[locret_train.fc1_name(l)] = torch.full((hidden, 12), fill + l, dtype=torch.float16)
            out[locret_train.fc2_name(l)] = torch.full((2, hidden), -fill - l, dtype=torch.float16)
        return out

    base, new, out = (str(tmp_path / f"{n}.safetensors") for n in ("base", "new", "out"))
    save_file(heads(4, 8, 100.0), base, metadata={"format": "pt", "locret_hidden": "8"})
    save_file({k: v.float() for k, v in heads(2, 8, 1.0).items()}, new)
    assert locret_pack.merge(new, base, out) == [0, 1]
    got = load_file(out)
    assert set(got) == set(heads(4, 8, 0.0))
    for l in range(4):
        want = 1.0 + l if l < 2 else 100.0 + l
        assert got[locret_train.fc1_name(l)].dtype == torch.float16
        assert (got[locret_train.fc1_name(l)] == want).all() and (got[locret_train.fc2_name(l)] == -want).all()
    bad = str(tmp_path / "bad_input.safetensors")
    save_file({locret_train.fc1_name(0): torch.ones(8, 13), locret_train.fc2_name(0): torch.ones(2, 8)}, bad)
    with pytest.raises(SystemExit, match="fc1"):
        locret_pack.merge(bad, base, str(tmp_path / "bad.safetensors"))


def _np_kl_rows(p_logits, q_logits):
    """mean over rows of KL(softmax(p) || softmax(q)), f64 numpy."""
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((p * (np.log(p) - lq)).sum(-1).mean())


def _np_z(a):
    return (a - a.mean(-1, keepdims=True)) / a.std(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["col", "tok", "tokraw"])
def test_rank_term_matches_numpy_reference(kind):
    rng = np.random.default_rng(7)
    L, H, P, beta = 3, 2, 50, 1.7
    pred = rng.normal(size=(L, H, P)) * 3
    target = rng.normal(size=(L, H, P)) * 2 + 1
    got = locret_train.rank_term(kind, torch.tensor(pred), torch.tensor(target), beta).item()
    if kind == "col":
        want = _np_kl_rows(beta * _np_z(target), beta * pred / target.std(-1, keepdims=True))
    else:
        s_t = target.reshape(L * H, P).max(0)
        s_p = pred.reshape(L * H, P)
        s_p = (s_p if kind == "tokraw" else _np_z(s_p)).max(0)
        want = _np_kl_rows(beta * _np_z(s_t)[None], beta * _np_z(s_p)[None])
    assert math.isfinite(got) and abs(got - want) < 1e-9 * max(1.0, abs(want)), (got, want)
    # zero exactly when the prediction is the target (col, tokraw; tok pools
    # the prediction by z_max and the target raw, so it is zero only where
    # the two poolings rank alike)
    if kind != "tok":
        assert locret_train.rank_term(kind, torch.tensor(target), torch.tensor(target), beta).item() < 1e-9
    # and not when one token's prediction moves to the bottom
    moved = target.copy()
    top = np.unravel_index(target.argmax(), target.shape)
    moved[top] = target.min() - 5
    assert locret_train.rank_term(kind, torch.tensor(moved), torch.tensor(target), beta).item() > 1e-3


def _variants_run(tiny, out, extra):
    return locret_train.main([
        "--model", str(tiny / "model"), "--tokens", str(tiny / "tokens.npy"),
        "--out", str(out), "--hidden", "8", "--seq-len", "96", "--response", "32",
        "--sequences", "6", "--holdout", "2", "--inner-steps", "4", "--epochs", "2",
        "--lr", "1e-2", "--device", "cpu", "--threads", "1", "--save-dtype", "float32", *extra,
    ])


def test_variants_share_features_and_match_single_runs(tiny, tmp_path):
    """Variants trained on cached features equal the same settings trained
    alone (one model forward per sequence and epoch); a ranking-loss variant
    trains, and a variant past --deadline is skipped."""
    infos = _variants_run(tiny, tmp_path / "v", ["--variant", "a:hidden=8", "--variant", "w:hidden=12,loss=col,beta=2",
                                                 "--variant", "t:hidden=8,loss=tok"])
    assert [i["variant"] for i in infos] == ["a", "w", "t"]
    alone = _variants_run(tiny, tmp_path / "alone", [])
    wa, wv = load_file(str(tmp_path / "alone.safetensors")), load_file(str(tmp_path / "v-a.safetensors"))
    assert wa.keys() == wv.keys() and all(torch.equal(wa[k], wv[k]) for k in wa)
    w = load_file(str(tmp_path / "v-w.safetensors"))
    assert w["model.layers.0.self_attn.fc1.weight"].shape[0] == 12
    js = json.load(open(tmp_path / "v-w.json"))
    assert js["loss"]["kind"] == "col" and js["loss"]["beta"] == 2.0 and js["features_cached"]
    for i in infos:
        tr, rnd = i["heldout"]["trained"], i["heldout"]["untrained_random"]
        assert all(math.isfinite(v) for v in tr.values()), tr
        assert tr["spearman"] > rnd["spearman"], (i["variant"], tr, rnd)
    late = _variants_run(tiny, tmp_path / "late", ["--deadline", "1e-9", "--variant", "a:hidden=8"])
    assert late == [] and not (tmp_path / "late-a.safetensors").exists()


def test_merge_pads_narrower_heads_exactly(trained, tmp_path):
    """merge of wider new heads over narrower base heads: the base layers,
    zero-padded, score as before (to f32 rounding); the new layers are the
    new ones; a narrower NEW over a wider BASE is refused."""
    from safetensors.torch import save_file

    from infinitehip import locret_pack

    out, _ = trained
    base = load_file(str(out) + ".safetensors")
    g = torch.Generator().manual_seed(3)
    new = {"model.layers.0.self_attn.fc1.weight": torch.randn(20, (NQ + 2 * NKV) * D, generator=g),
           "model.layers.0.self_attn.fc2.weight": torch.randn(NKV, 20, generator=g)}
    save_file(new, str(tmp_path / "new.safetensors"))
    taken = locret_pack.merge(str(tmp_path / "new.safetensors"), str(out) + ".safetensors",
                              str(tmp_path / "m.safetensors"))
    assert taken == [0]
    m = load_file(str(tmp_path / "m.safetensors"))
    x = torch.randn(33, (NQ + 2 * NKV) * D, generator=g)

    def score(w, l):
        f1, f2 = w[f"model.layers.{l}.self_attn.fc1.weight"], w[f"model.layers.{l}.self_attn.fc2.weight"]
        return torch.nn.functional.silu(x @ f1.T) @ f2.T

    assert torch.equal(score(m, 0), score(new, 0))
    assert m["model.layers.1.self_attn.fc1.weight"].shape[0] == 20
    # equal up to f32 summation order (the padded terms are exact zeros)
    torch.testing.assert_close(score(m, 1), score(base, 1), rtol=1e-6, atol=1e-6)
    assert m["model.layers.1.self_attn.fc1.weight"][8:].abs().max() == 0
    with pytest.raises(SystemExit, match="narrower"):
        locret_pack.merge(str(out) + ".safetensors", str(tmp_path / "m.safetensors"), str(tmp_path / "x.safetensors"))


def test_init_starts_from_a_heads_file(tiny, trained, tmp_path):
    """--init loads a heads file as the starting point: with no epochs the
    written heads are that file; a width mismatch is refused."""
    out, _ = trained
    _variants_run(tiny, tmp_path / "i", ["--init", str(out) + ".safetensors", "--epochs", "0"])
    a, b = load_file(str(out) + ".safetensors"), load_file(str(tmp_path / "i.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    js = json.load(open(tmp_path / "i.json"))
    assert js["init"]["path"].endswith(".safetensors") and js["optimizer_steps"] == 0
    with pytest.raises(SystemExit, match="--init"):
        _variants_run(tiny, tmp_path / "j", ["--init", str(out) + ".safetensors", "--hidden", "12"])


def test_cache_dtype_equals_training_on_rounded_features(tiny, tmp_path, monkeypatch):
    """--cache-dtype float16 keeps the cached projections in float16: the
    heads equal (bit for bit) a float32-cached run whose collector rounds
    its projections through float16, and differ from the unrounded run (so
    the option is not a no-op); the record says which dtype was cached."""
    half = _variants_run(tiny, tmp_path / "h", ["--cache-dtype", "float16", "--variant", "a:hidden=8"])
    assert json.load(open(tmp_path / "h-a.json"))["cache_dtype"] == "float16"
    plain = _variants_run(tiny, tmp_path / "p", ["--variant", "a:hidden=8"])
    assert json.load(open(tmp_path / "p-a.json"))["cache_dtype"] == "float32"
    call = locret_train.Collector.__call__

    def rounded(self, ids, response):
        x, t = call(self, ids, response)
        return x.to(torch.float16).float(), t

    monkeypatch.setattr(locret_train.Collector, "__call__", rounded)
    ref = _variants_run(tiny, tmp_path / "r", ["--variant", "a:hidden=8"])
    h, r, p = (load_file(str(tmp_path / f"{n}-a.safetensors")) for n in "hrp")
    # the held-out sequences are not cached: evaluate the same way in both
    assert h.keys() == r.keys() and all(torch.equal(h[k], r[k]) for k in h)
    assert any(not torch.equal(h[k], p[k]) for k in h)
    for info in (half, plain, ref):  # one variant: main returns its record
        assert all(math.isfinite(v) for v in info["heldout"]["trained"].values())
