// ihip_run: a small libllama driver for the llama.cpp integration tests and
// benchmark. The same source is compiled against stock and patched libllama;
// with LLAMA_INFINITEHIP_CONFIG set, the patched one runs our attention.
//
//   ihip_run gen   MODEL --prompt-len P --gen N [--force TOKENS] [--state FILE] --logits OUT --tokens OUT
//       random prompt (seeded ids; with --state, its KV loaded from a `fill`
//       session of --depth P, last token re-decoded), then N greedy steps (or
//       the tokens in TOKENS, teacher forcing); writes each step's full
//       logits (f32) and the tokens generated.
//   ihip_run fill  MODEL --depth D --state FILE
//       prefill D random tokens and save the session state.
//   ihip_run bench MODEL --depth D --gen N [--state FILE]
//       load the state (or prefill D tokens), then time N decode steps;
//       prints one JSON line.
//   ihip_run tokenize MODEL --text FILE --out IDS
//       tokenize a UTF-8 text file (BOS added if the model adds one);
//       writes int32 token ids.
//   ihip_run score MODEL --input IDS --prefill P [--n N] --nll OUT
//       teacher-forced scoring of the first N ids (default: all): the first
//       P go through prefill ubatches (logits of every row), the rest one
//       token per llama_decode (the single-token decode path). Writes N
//       records {f32 nll, i32 argmax, i32 path} where record i scores
//       target ids[i] (record 0 is empty: nll NaN, path -1) and path says
//       which call produced the logits (0 = a prefill ubatch, 1 = a
//       single-token decode step, 2 = a continuation ubatch). Prints one
//       JSON line with timings. --prefill-logits last: the prefill asks for
//       the last prompt token's logits only (what LazyLLM may prune around;
//       prefill_s is then the time to first token); --cont batch: the rest
//       goes in ubatches of --batch with every row's logits instead of one
//       token per llama_decode. --logits OUT: also write the prefill rows'
//       full logits (f32 [rows][n_vocab], the rows that have logits).
//   ihip_run dequant MODEL --out GGUF
//       write MODEL with every tensor dequantized to f32 (llama.cpp's own
//       quantizer, "pure" F32): the quality suite's exactness check needs
//       weights without quantization noise.
//
// Common: --ctx N (default: enough for the run), --threads T (2), --batch B
// (512), --fa on|off|auto (off), --seed S (1), --kv f16|f32 (K/V cache type, f16),
// --nkvo 1 (llama.cpp's --no-kv-offload: K/V in host memory).
//
// IHIP_DUMP_TENSOR=NAME[,NAME..] IHIP_DUMP_PATH=FILE (environment): every
// time the graph computes a tensor so named (e.g. "kqv_out-0", layer 0's
// attention output on either route, "Kcur-0" its rotated keys: llama.cpp's
// eval callback), append {i32 index of the name in the list, i32 row_elems,
// i32 rows} and its f32 data to FILE. gpu_test.py compares two routes call
// by call with it.
#include "ggml-backend.h"
#include "llama.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

struct TensorDump {
    std::vector<std::string> names;
    FILE * f = nullptr;
    std::vector<float> buf;
};

// llama.cpp's eval callback: `ask` selects the tensors to observe, then each
// is observed after it is computed (on its own backend: copied back first).
static bool dump_tensor_cb(ggml_tensor * t, bool ask, void * user) {
    auto * d = (TensorDump *) user;
    int32_t idx = -1;
    for (size_t i = 0; i < d->names.size(); ++i) {
        if (d->names[i] == t->name) idx = (int32_t) i;
    }
    if (idx < 0) return !ask;
    if (ask) return true;
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        std::fprintf(stderr, "ihip_run: IHIP_DUMP_TENSOR %s is not contiguous f32: not dumped\n", t->name);
        return true;
    }
    const int64_t n = ggml_nelements(t);
    d->buf.resize(n);
    ggml_backend_tensor_get(t, d->buf.data(), 0, n * sizeof(float));
    const int32_t hdr[3] = {idx, (int32_t) t->ne[0], (int32_t) (n / t->ne[0])};
    std::fwrite(hdr, sizeof(int32_t), 3, d->f);
    std::fwrite(d->buf.data(), sizeof(float), n, d->f);
    return true;
}

static void die(const std::string & msg) {
    std::fprintf(stderr, "ihip_run: %s\n", msg.c_str());
    std::exit(1);
}

struct Args {
    std::string mode, model, force, logits_out, tokens_out, state, fa = "off", text, out, input, nll_out, kv = "f16", depths;
    std::string prefill_logits = "all", cont = "decode";
    int prompt_len = 64, gen = 16, depth = 0, ctx = 0, threads = 2, batch = 512, seed = 1, prefill = -1, n = -1;
    int nkvo = 0;
};

static Args parse(int argc, char ** argv) {
    if (argc < 3) die("usage: ihip_run gen|fill|bench|tokenize|score|dequant MODEL [options] (see the source header)");
    Args a;
    a.mode = argv[1];
    a.model = argv[2];
    for (int i = 3; i < argc; i++) {
        std::string k = argv[i];
        if (i + 1 >= argc) die("missing value for " + k);
        std::string v = argv[++i];
        if (k == "--prompt-len") a.prompt_len = std::stoi(v);
        else if (k == "--gen") a.gen = std::stoi(v);
        else if (k == "--depth") a.depth = std::stoi(v);
        else if (k == "--ctx") a.ctx = std::stoi(v);
        else if (k == "--threads") a.threads = std::stoi(v);
        else if (k == "--batch") a.batch = std::stoi(v);
        else if (k == "--seed") a.seed = std::stoi(v);
        else if (k == "--force") a.force = v;
        else if (k == "--logits") a.logits_out = v;
        else if (k == "--tokens") a.tokens_out = v;
        else if (k == "--state") a.state = v;
        else if (k == "--fa") a.fa = v;
        else if (k == "--text") a.text = v;
        else if (k == "--out") a.out = v;
        else if (k == "--input") a.input = v;
        else if (k == "--nll") a.nll_out = v;
        else if (k == "--prefill") a.prefill = std::stoi(v);
        else if (k == "--n") a.n = std::stoi(v);
        else if (k == "--kv") a.kv = v;
        else if (k == "--depths") a.depths = v;
        else if (k == "--prefill-logits") a.prefill_logits = v;
        else if (k == "--cont") a.cont = v;
        else if (k == "--nkvo") a.nkvo = std::stoi(v);
        else die("unknown option " + k);
    }
    if (a.kv != "f16" && a.kv != "f32") die("--kv must be f16 or f32");
    if (a.prefill_logits != "all" && a.prefill_logits != "last") die("--prefill-logits must be all or last");
    if (a.cont != "decode" && a.cont != "batch") die("--cont must be decode or batch");
    return a;
}

static std::vector<llama_token> random_tokens(int n, int n_vocab, int seed) {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> d(3, n_vocab - 1);  // skip unk/bos/eos
    std::vector<llama_token> t(n);
    for (auto & x : t) x = d(gen);
    return t;
}

static double now_s();

// Prefill in ubatches of `batch`; `times` (optional) gets each one's seconds.
static void decode_all(llama_context * ctx, std::vector<llama_token> & toks, int batch,
                       std::vector<double> * times = nullptr) {
    for (size_t i = 0; i < toks.size(); i += batch) {
        int n = (int) std::min<size_t>(batch, toks.size() - i);
        double t0 = now_s();
        if (llama_decode(ctx, llama_batch_get_one(toks.data() + i, n)) != 0) die("llama_decode failed (prefill)");
        if (times) times->push_back(now_s() - t0);
    }
}

static std::string json_list(const std::vector<double> & v) {
    std::string s = "[";
    char buf[32];
    for (size_t i = 0; i < v.size(); i++) {
        std::snprintf(buf, sizeof buf, "%s%.4f", i ? "," : "", v[i]);
        s += buf;
    }
    return s + "]";
}

static std::vector<llama_token> read_ids(const std::string & path);

// --input ids (real text) when given, else random tokens; `n` of them from `off`
static std::vector<llama_token> bench_tokens(const Args & a, int n, int n_vocab, int off, int seed) {
    if (a.input.empty()) return random_tokens(n, n_vocab, seed);
    std::vector<llama_token> ids = read_ids(a.input);
    if ((int) ids.size() < off + n) die("--input holds " + std::to_string(ids.size()) + " ids, need " + std::to_string(off + n));
    return std::vector<llama_token>(ids.begin() + off, ids.begin() + off + n);
}

static std::vector<llama_token> read_ids(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read " + path);
    std::vector<llama_token> ids;
    llama_token t;
    while (f.read((char *) &t, sizeof t)) ids.push_back(t);
    return ids;
}

// -log softmax(logits)[target] in double, and the argmax.
static void nll_of(const float * logits, int n_vocab, llama_token target, float & nll, int32_t & best) {
    best = 0;
    for (int i = 1; i < n_vocab; i++) if (logits[i] > logits[best]) best = i;
    double m = logits[best], sum = 0.0;
    for (int i = 0; i < n_vocab; i++) sum += std::exp((double) logits[i] - m);
    nll = (float) (m + std::log(sum) - (double) logits[target]);
}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char ** argv) {
    Args a = parse(argc, argv);
    llama_backend_init();
    if (!std::getenv("IHIP_RUN_VERBOSE")) {
        llama_log_set([](ggml_log_level level, const char * text, void *) {
            if (level >= GGML_LOG_LEVEL_WARN || std::strstr(text, "infinitehip")) std::fputs(text, stderr);
        }, nullptr);
    }
    if (a.mode == "dequant") {
        if (a.out.empty()) die("dequant needs --out GGUF");
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.nthread = a.threads;
        qp.ftype = LLAMA_FTYPE_ALL_F32;
        qp.allow_requantize = true;  // Q4_1 -> f32 goes through llama.cpp's dequantizer
        qp.pure = true;              // every tensor f32, output and embeddings included
        if (llama_model_quantize(a.model.c_str(), a.out.c_str(), &qp) != 0) die("dequant failed");
        std::printf("{\"mode\":\"dequant\",\"out\":\"%s\"}\n", a.out.c_str());
        llama_backend_free();
        return 0;
    }
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(a.model.c_str(), mp);
    if (!model) die("cannot load model " + a.model);
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    const llama_vocab * vocab = llama_model_get_vocab(model);
    if (a.mode == "tokenize") {
        std::ifstream f(a.text, std::ios::binary);
        if (!f) die("cannot read --text " + a.text);
        std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        std::vector<llama_token> ids(text.size() + 16);
        int n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                               llama_vocab_get_add_bos(vocab), false);
        if (n < 0) die("tokenize failed");
        ids.resize(n);
        std::ofstream o(a.out, std::ios::binary);
        if (!o) die("cannot write --out " + a.out);
        o.write((const char *) ids.data(), sizeof(llama_token) * ids.size());
        std::printf("{\"mode\":\"tokenize\",\"bytes\":%zu,\"tokens\":%d}\n", text.size(), n);
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }
    std::vector<llama_token> ids;
    if (a.mode == "score") {
        ids = read_ids(a.input);
        if (a.n > 0) {
            if (a.n > (int) ids.size()) die("--n " + std::to_string(a.n) + " exceeds the " + std::to_string(ids.size()) + " ids in --input");
            ids.resize(a.n);
        }
        if (a.prefill < 1 || a.prefill > (int) ids.size()) die("--prefill must be in 1..n (n = " + std::to_string(ids.size()) + ")");
        if (a.nll_out.empty()) die("score needs --nll OUT");
    }
    int need = a.mode == "gen" ? a.prompt_len + a.gen + 1 : a.mode == "score" ? (int) ids.size() + 1 : a.depth + a.gen + 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = a.ctx > 0 ? a.ctx : ((need + 255) / 256) * 256;
    cp.n_batch = a.batch;
    cp.n_ubatch = a.batch;
    cp.n_threads = a.threads;
    cp.n_threads_batch = a.threads;
    cp.flash_attn_type = a.fa == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                       : a.fa == "auto" ? LLAMA_FLASH_ATTN_TYPE_AUTO : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = false;
    cp.type_k = cp.type_v = a.kv == "f32" ? GGML_TYPE_F32 : GGML_TYPE_F16;
    cp.offload_kqv = a.nkvo == 0;
    static TensorDump dump;
    if (const char * dn = std::getenv("IHIP_DUMP_TENSOR")) {
        const char * dp = std::getenv("IHIP_DUMP_PATH");
        if (!dp) die("IHIP_DUMP_TENSOR needs IHIP_DUMP_PATH");
        for (const char * p = dn; *p;) {
            const char * e = std::strchr(p, ',');
            dump.names.emplace_back(p, e ? e - p : std::strlen(p));
            p = e ? e + 1 : p + std::strlen(p);
        }
        dump.f = std::fopen(dp, "wb");
        if (!dump.f) die(std::string("cannot write IHIP_DUMP_PATH ") + dp);
        cp.cb_eval = dump_tensor_cb;
        cp.cb_eval_user_data = &dump;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) die("cannot create context (see the log above)");

    if (a.mode == "gen") {
        std::vector<llama_token> prompt = random_tokens(a.prompt_len, n_vocab, a.seed);
        std::vector<llama_token> forced;
        if (!a.force.empty()) {
            std::ifstream f(a.force, std::ios::binary);
            if (!f) die("cannot read " + a.force);
            llama_token t;
            while (f.read((char *) &t, sizeof t)) forced.push_back(t);
            if ((int) forced.size() < a.gen) die("forced token file shorter than --gen");
        }
        if (!a.state.empty()) {
            // the prompt's KV from a session file (made by `fill` with the same --depth/--seed)
            std::vector<llama_token> st(a.prompt_len + 16);
            size_t n_loaded = 0;
            if (!llama_state_load_file(ctx, a.state.c_str(), st.data(), st.size(), &n_loaded)) die("cannot load state " + a.state);
            if ((int) n_loaded != a.prompt_len) die("state holds " + std::to_string(n_loaded) + " tokens, --prompt-len says " + std::to_string(a.prompt_len));
            // logits of the last prompt token: re-decode it on top of the loaded KV
            llama_memory_seq_rm(llama_get_memory(ctx), 0, a.prompt_len - 1, -1);
            llama_token last = prompt.back();
            if (llama_decode(ctx, llama_batch_get_one(&last, 1)) != 0) die("llama_decode failed (after state load)");
        } else {
            decode_all(ctx, prompt, a.batch);
        }
        std::ofstream lo(a.logits_out, std::ios::binary), to(a.tokens_out, std::ios::binary);
        if (!lo || !to) die("cannot write --logits/--tokens");
        for (int step = 0; step < a.gen; step++) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            lo.write((const char *) logits, sizeof(float) * n_vocab);
            llama_token best = 0;
            for (int i = 1; i < n_vocab; i++) if (logits[i] > logits[best]) best = i;
            llama_token next = forced.empty() ? best : forced[step];
            to.write((const char *) &next, sizeof next);
            if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) die("llama_decode failed (generation)");
        }
        std::printf("{\"mode\":\"gen\",\"prompt_len\":%d,\"gen\":%d,\"n_vocab\":%d}\n", a.prompt_len, a.gen, n_vocab);
    } else if (a.mode == "fill") {
        std::vector<llama_token> toks = bench_tokens(a, a.depth, n_vocab, 0, a.seed);
        std::vector<double> ub;
        double t0 = now_s();
        decode_all(ctx, toks, a.batch, &ub);
        double t1 = now_s();
        if (!a.state.empty() && !llama_state_save_file(ctx, a.state.c_str(), toks.data(), toks.size())) die("cannot save state " + a.state);
        std::printf("{\"mode\":\"fill\",\"depth\":%d,\"threads\":%d,\"batch\":%d,\"prefill_s\":%.3f,\"ubatch_s\":%s}\n",
                    a.depth, a.threads, a.batch, t1 - t0, json_list(ub).c_str());
    } else if (a.mode == "bench") {
        std::vector<llama_token> toks(a.depth + 16);
        double t0 = now_s();
        size_t n_loaded = 0;
        if (!a.state.empty()) {
            if (!llama_state_load_file(ctx, a.state.c_str(), toks.data(), toks.size(), &n_loaded)) die("cannot load state " + a.state);
            if ((int) n_loaded != a.depth) die("state holds " + std::to_string(n_loaded) + " tokens, --depth says " + std::to_string(a.depth));
        } else {
            toks = bench_tokens(a, a.depth, n_vocab, 0, a.seed);
            decode_all(ctx, toks, a.batch);
        }
        double t1 = now_s();
        std::vector<llama_token> gen = bench_tokens(a, a.gen, n_vocab, a.depth, a.seed + 1);
        if (!a.depths.empty()) {
            // decode at several depths (descending) from one loaded context:
            // cut the sequence to each depth, then time gen-1 steps after one
            std::string rows;
            size_t p0 = 0;
            while (p0 < a.depths.size()) {
                size_t p1 = a.depths.find(',', p0);
                if (p1 == std::string::npos) p1 = a.depths.size();
                int d = std::stoi(a.depths.substr(p0, p1 - p0));
                p0 = p1 + 1;
                if (d < 1 || d > a.depth) die("--depths entries must be in 1..--depth");
                llama_memory_seq_rm(llama_get_memory(ctx), 0, d, -1);
                llama_token nx = gen[0];
                if (llama_decode(ctx, llama_batch_get_one(&nx, 1)) != 0) die("llama_decode failed (decode)");
                double s0 = now_s();
                for (int i = 1; i < a.gen; i++) {
                    nx = gen[i];
                    if (llama_decode(ctx, llama_batch_get_one(&nx, 1)) != 0) die("llama_decode failed (decode)");
                    (void) llama_get_logits_ith(ctx, -1);
                }
                double s1 = now_s();
                char buf[160];
                std::snprintf(buf, sizeof buf, "%s{\"depth\":%d,\"decode_tokens\":%d,\"decode_s\":%.4f,\"decode_tok_s\":%.2f}",
                              rows.empty() ? "" : ",", d, a.gen - 1, s1 - s0, (a.gen - 1) / (s1 - s0));
                rows += buf;
            }
            // graphs_reused: decode steps that reused the previous step's graph (llama.cpp's graph reuse)
            std::printf("{\"mode\":\"bench\",\"depth\":%d,\"threads\":%d,\"load_or_prefill_s\":%.3f,\"decode\":[%s],"
                        "\"graphs_reused\":%d}\n",
                        a.depth, a.threads, t1 - t0, rows.c_str(), llama_perf_context(ctx).n_reused);
            llama_free(ctx);
            llama_model_free(model);
            llama_backend_free();
            return 0;
        }
        // one untimed step (first graph build for a single token)
        llama_token next = gen[0];
        if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) die("llama_decode failed (decode)");
        double t2 = now_s();
        for (int i = 1; i < a.gen; i++) {
            next = gen[i];
            if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) die("llama_decode failed (decode)");
            (void) llama_get_logits_ith(ctx, -1);
        }
        double t3 = now_s();
        int timed = a.gen - 1;
        std::printf("{\"mode\":\"bench\",\"depth\":%d,\"threads\":%d,\"load_or_prefill_s\":%.3f,\"decode_tokens\":%d,"
                    "\"decode_s\":%.4f,\"decode_tok_s\":%.2f}\n",
                    a.depth, a.threads, t1 - t0, timed, t3 - t2, timed / (t3 - t2));
    } else if (a.mode == "score") {
        const int n = (int) ids.size(), p = a.prefill;
        struct Rec { float nll; int32_t argmax; int32_t path; };
        std::vector<Rec> rec(n, Rec{NAN, -1, -1});
        llama_batch b = llama_batch_init(a.batch, 0, 1);
        std::ofstream plo;
        if (!a.logits_out.empty()) {
            plo.open(a.logits_out, std::ios::binary);
            if (!plo) die("cannot write --logits " + a.logits_out);
        }
        double t0 = now_s();
        for (int i0 = 0; i0 < p; i0 += a.batch) {
            int m = std::min(a.batch, p - i0);
            b.n_tokens = m;
            for (int j = 0; j < m; j++) {
                b.token[j] = ids[i0 + j];
                b.pos[j] = i0 + j;
                b.n_seq_id[j] = 1;
                b.seq_id[j][0] = 0;
                b.logits[j] = a.prefill_logits == "all" || i0 + j == p - 1;
            }
            if (llama_decode(ctx, b) != 0) die("llama_decode failed (prefill)");
            for (int j = 0; j < m; j++) {
                int tgt = i0 + j + 1;
                if (tgt >= n) break;
                if (!b.logits[j]) continue;
                nll_of(llama_get_logits_ith(ctx, j), n_vocab, ids[tgt], rec[tgt].nll, rec[tgt].argmax);
                rec[tgt].path = 0;
                if (plo) plo.write((const char *) llama_get_logits_ith(ctx, j), sizeof(float) * n_vocab);
            }
        }
        double t1 = now_s();
        for (int i0 = p; a.cont == "batch" && i0 + 1 < n; i0 += a.batch) {
            int m = std::min(a.batch, n - 1 - i0);
            b.n_tokens = m;
            for (int j = 0; j < m; j++) {
                b.token[j] = ids[i0 + j];
                b.pos[j] = i0 + j;
                b.n_seq_id[j] = 1;
                b.seq_id[j][0] = 0;
                b.logits[j] = true;
            }
            if (llama_decode(ctx, b) != 0) die("llama_decode failed (continuation)");
            for (int j = 0; j < m; j++) {
                int tgt = i0 + j + 1;
                nll_of(llama_get_logits_ith(ctx, j), n_vocab, ids[tgt], rec[tgt].nll, rec[tgt].argmax);
                rec[tgt].path = 2;
            }
        }
        for (int i = p; a.cont == "decode" && i + 1 < n; i++) {
            llama_token tok = ids[i];
            if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) die("llama_decode failed (decode)");
            nll_of(llama_get_logits_ith(ctx, -1), n_vocab, ids[i + 1], rec[i + 1].nll, rec[i + 1].argmax);
            rec[i + 1].path = 1;
        }
        double t2 = now_s();
        llama_batch_free(b);
        std::ofstream o(a.nll_out, std::ios::binary);
        if (!o) die("cannot write --nll " + a.nll_out);
        o.write((const char *) rec.data(), sizeof(Rec) * rec.size());
        int dec = std::max(0, n - 1 - p);
        std::printf("{\"mode\":\"score\",\"n\":%d,\"prefill\":%d,\"threads\":%d,\"prefill_s\":%.4f,"
                    "\"prefill_tok_s\":%.2f,\"decode_tokens\":%d,\"decode_s\":%.4f,\"decode_tok_s\":%.2f}\n",
                    n, p, a.threads, t1 - t0, p / (t1 - t0), dec, t2 - t1, dec > 0 ? dec / (t2 - t1) : 0.0);
    } else {
        die("unknown mode " + a.mode);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
