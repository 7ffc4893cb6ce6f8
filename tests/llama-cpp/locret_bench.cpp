// Locret scoring on llama.cpp: the retaining-head MLP as ggml graph ops
// (patch 0003's llama_ihip_locret_mlp on the CPU backend) vs the Rust scoring
// op (LlamaPlugin::locret_score, the reference twin), same process, same
// random inputs, at a given head shape (default Llama-3.1-8B: 32 q heads,
// 8 KV heads, head_dim 128, hidden 1024).
//
// Also a check: the ggml scores against the core's f64 reference
// (LlamaPlugin::locret_check, max |s - ref| / max(|ref|, 1) <= --tol), and a
// negative control (fc1 with q/k columns permuted must fail that bound).
// Exit status 1 when either check fails. Prints one JSON line.
//
// Build (scripts/llama-cpp-build.sh patched does it):
//   g++ -O2 -std=c++17 locret_bench.cpp -I src/include -I src/ggml/include -I target/cxxbridge \
//       -L build/bin -lllama -lggml -lggml-base -lggml-cpu -Wl,-rpath,build/bin
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include "infinitehip-cpp-bridge/src/lib.rs.h"
#include "rust/cxx.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

// patch 0003 (src/llama-infinitehip.cpp), exported by libllama
ggml_tensor * llama_ihip_locret_mlp(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                    ggml_tensor * fc1, ggml_tensor * fc2);

namespace {

struct Rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9e3779b97f4a7c15ULL;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    double uniform() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
    std::vector<float> normal(size_t n, double sd) {
        std::vector<float> o(n);
        for (size_t i = 0; i < n; ++i) {
            o[i] = (float) (sd * std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()));
        }
        return o;
    }
};

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// safetensors with layer 0's fc1 [hidden, in] and fc2 [nkv, hidden], F32
void write_heads(const std::string & path, const std::vector<float> & w1, const std::vector<float> & w2, long hidden,
                 long in, long nkv) {
    const size_t b1 = w1.size() * 4, b2 = w2.size() * 4;
    std::string h = "{\"model.layers.0.self_attn.fc1.weight\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(hidden) +
                    "," + std::to_string(in) + "],\"data_offsets\":[0," + std::to_string(b1) +
                    "]},\"model.layers.0.self_attn.fc2.weight\":{\"dtype\":\"F32\",\"shape\":[" + std::to_string(nkv) +
                    "," + std::to_string(hidden) + "],\"data_offsets\":[" + std::to_string(b1) + "," +
                    std::to_string(b1 + b2) + "]}}";
    while (h.size() % 8) h += ' ';
    std::ofstream f(path, std::ios::binary);
    const uint64_t n = h.size();
    f.write((const char *) &n, 8);
    f.write(h.data(), h.size());
    f.write((const char *) w1.data(), b1);
    f.write((const char *) w2.data(), b2);
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        std::exit(2);
    }
}

infinitehip::TensorDesc desc(const ggml_tensor * t) {
    return infinitehip::TensorDesc{(uint32_t) t->type, t->ne[0], t->ne[1], t->ne[2], t->ne[3],
                                   (uint64_t) t->nb[0], (uint64_t) t->nb[1], (uint64_t) t->nb[2], (uint64_t) t->nb[3]};
}

rust::Slice<const uint8_t> bytes(const ggml_tensor * t) {
    return rust::Slice<const uint8_t>((const uint8_t *) t->data, ggml_nbytes(t));
}

infinitehip::TensorDesc desc3(long d, long h, long n) {
    return infinitehip::TensorDesc{0, d, h, n, 1, 4, (uint64_t) (4 * d), (uint64_t) (4 * d * h), (uint64_t) (4 * d * h * n)};
}

rust::Slice<const uint8_t> bytes(const std::vector<float> & x) {
    return rust::Slice<const uint8_t>((const uint8_t *) x.data(), x.size() * 4);
}

double json_num(const std::string & js, const std::string & key) {
    const size_t p = js.find("\"" + key + "\":");
    if (p == std::string::npos) return NAN;
    const char * s = js.c_str() + p + key.size() + 3;
    if (std::strncmp(s, "null", 4) == 0) return INFINITY;  // serde_json writes inf as null
    return std::atof(s);
}

void begin(infinitehip::LlamaPlugin & p, long n) {
    std::vector<int32_t> pos(n), seq(n, 0);
    std::vector<uint32_t> ns(n, 1);
    for (long i = 0; i < n; ++i) pos[i] = (int32_t) i;
    p.locret_begin(rust::Slice<const int32_t>(pos.data(), n), rust::Slice<const uint32_t>(ns.data(), n),
                   rust::Slice<const int32_t>(seq.data(), n));
}

}  // namespace

int main(int argc, char ** argv) {
    long n = 256, nq = 32, nkv = 8, d = 128, hidden = 1024, reps = 3;
    std::vector<int> threads = {1, 2};
    double tol = 1e-5;
    std::string dir = "/tmp";
    for (int i = 1; i + 1 < argc; i += 2) {
        const std::string a = argv[i];
        const char * v = argv[i + 1];
        if (a == "--tokens") n = std::atol(v);
        else if (a == "--nq") nq = std::atol(v);
        else if (a == "--nkv") nkv = std::atol(v);
        else if (a == "--d") d = std::atol(v);
        else if (a == "--hidden") hidden = std::atol(v);
        else if (a == "--reps") reps = std::atol(v);
        else if (a == "--tol") tol = std::atof(v);
        else if (a == "--dir") dir = v;
        else if (a == "--threads") {
            threads.clear();
            for (const char * s = v; *s;) {
                threads.push_back(std::atoi(s));
                while (*s && *s != ',') ++s;
                if (*s) ++s;
            }
        } else {
            fprintf(stderr, "unknown option %s\n", a.c_str());
            return 2;
        }
    }
    const long in = (nq + 2 * nkv) * d;
    Rng rng{12345};
    const std::vector<float> w1 = rng.normal(hidden * in, 1.0 / std::sqrt((double) in));
    const std::vector<float> w2 = rng.normal(nkv * hidden, 1.0 / std::sqrt((double) hidden));
    const std::vector<float> q = rng.normal(n * nq * d, 1.0), k = rng.normal(n * nkv * d, 1.0),
                             v = rng.normal(n * nkv * d, 1.0);
    const std::string wpath = dir + "/ihip_locret_bench_heads.safetensors";
    write_heads(wpath, w1, w2, hidden, in, nkv);
    const std::string cfg = "{\"dense_layers\": 0, \"default\": {\"method\": \"locret\", \"budget\": 1000000, "
                            "\"hidden\": " + std::to_string(hidden) + ", \"weights\": \"" + wpath + "\"}}";
    const infinitehip::ModelInfo mi{1, (uint32_t) nq, (uint32_t) nkv, (uint32_t) d, 500000.0f, 131072};
    auto plugin = infinitehip::llama_plugin_new(cfg, mi);

    // ---- ggml graph: weights and inputs in a CPU backend buffer
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_init_params wp = {16 * ggml_tensor_overhead(), nullptr, true};
    ggml_context * wctx = ggml_init(wp);
    ggml_tensor * t_w1 = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, in, hidden);
    ggml_tensor * t_w1p = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, in, hidden);  // negative control
    ggml_tensor * t_w2 = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, hidden, nkv);
    ggml_tensor * t_q = ggml_new_tensor_3d(wctx, GGML_TYPE_F32, d, nq, n);
    ggml_tensor * t_k = ggml_new_tensor_3d(wctx, GGML_TYPE_F32, d, nkv, n);
    ggml_tensor * t_v = ggml_new_tensor_3d(wctx, GGML_TYPE_F32, d, nkv, n);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors(wctx, be);
    {
        rust::Vec<float> f1 = plugin->locret_graph_fc1(0, false), f1p = plugin->locret_graph_fc1(0, true),
                         f2 = plugin->locret_graph_fc2(0);
        ggml_backend_tensor_set(t_w1, f1.data(), 0, f1.size() * 4);
        ggml_backend_tensor_set(t_w1p, f1p.data(), 0, f1p.size() * 4);
        ggml_backend_tensor_set(t_w2, f2.data(), 0, f2.size() * 4);
        ggml_backend_tensor_set(t_q, q.data(), 0, q.size() * 4);
        ggml_backend_tensor_set(t_k, k.data(), 0, k.size() * 4);
        ggml_backend_tensor_set(t_v, v.data(), 0, v.size() * 4);
    }
    ggml_init_params gp = {64 * ggml_tensor_overhead() + 2 * ggml_graph_overhead(), nullptr, true};
    ggml_context * gctx = ggml_init(gp);
    ggml_tensor * s = llama_ihip_locret_mlp(gctx, t_q, t_k, t_v, t_w1, t_w2);
    ggml_tensor * sp = llama_ihip_locret_mlp(gctx, t_q, t_k, t_v, t_w1p, t_w2);
    ggml_cgraph * gf = ggml_new_graph(gctx);
    ggml_build_forward_expand(gf, s);
    ggml_cgraph * gfp = ggml_new_graph(gctx);
    ggml_build_forward_expand(gfp, sp);
    ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    ggml_gallocr_t gap = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
    if (!ggml_gallocr_alloc_graph(ga, gf) || !ggml_gallocr_alloc_graph(gap, gfp)) {
        fprintf(stderr, "graph allocation failed\n");
        return 2;
    }

    const auto qd = desc3(d, nq, n), kd = desc3(d, nkv, n), vd = desc3(d, nkv, n);
    std::string out = "{\"tokens\": " + std::to_string(n) + ", \"shape\": {\"n_q_heads\": " + std::to_string(nq) +
                      ", \"n_kv_heads\": " + std::to_string(nkv) + ", \"head_dim\": " + std::to_string(d) +
                      ", \"hidden\": " + std::to_string(hidden) + "}, \"reps\": " + std::to_string(reps) +
                      ", \"hw_threads\": " + std::to_string(std::thread::hardware_concurrency()) +
                      ", \"per_layer_s\": {";
    bool first = true;
    for (int nth : threads) {
        // before: the Rust scoring op, nth threads over disjoint token ranges (as ggml runs it)
        double rust_best = 1e30, ggml_best = 1e30;
        for (long r = 0; r < reps; ++r) {
            begin(*plugin, n);
            const double t0 = now();
            std::vector<std::thread> th;
            for (int ith = 0; ith < nth; ++ith) {
                th.emplace_back([&, ith] {
                    plugin->locret_score(0, bytes(q), qd, bytes(k), kd, bytes(v), vd, rust::Slice<const uint8_t>(),
                                         qd, (uint32_t) ith, (uint32_t) nth);
                });
            }
            for (auto & t : th) t.join();
            rust_best = std::min(rust_best, now() - t0);
        }
        // after: the graph (concat, mul_mat, silu, mul_mat) + the one-thread record op
        ggml_backend_cpu_set_n_threads(be, nth);
        ggml_backend_graph_compute(be, gf);  // warm-up
        for (long r = 0; r < reps; ++r) {
            begin(*plugin, n);
            const double t0 = now();
            ggml_backend_graph_compute(be, gf);
            plugin->locret_record(0, bytes(s), desc(s), rust::Slice<const uint8_t>(), desc(s));
            ggml_best = std::min(ggml_best, now() - t0);
        }
        char buf[256];
        snprintf(buf, sizeof buf, "%s\"%d\": {\"rust_op\": %.4f, \"ggml\": %.4f, \"speedup\": %.1f}", first ? "" : ", ",
                 nth, rust_best, ggml_best, rust_best / ggml_best);
        out += buf;
        first = false;
    }
    out += "}";

    // check: ggml scores vs the core's f64 reference; negative control must fail
    begin(*plugin, n);
    plugin->locret_check(0, bytes(s), desc(s), bytes(q), qd, bytes(k), kd, bytes(v), vd);
    const double err = json_num(std::string(plugin->stats_json()), "check_max_rel_err");
    ggml_backend_graph_compute(be, gfp);
    auto plugin2 = infinitehip::llama_plugin_new(cfg, mi);
    begin(*plugin2, n);
    plugin2->locret_check(0, bytes(sp), desc(sp), bytes(q), qd, bytes(k), kd, bytes(v), vd);
    const double err_neg = json_num(std::string(plugin2->stats_json()), "check_max_rel_err");
    const bool ok = err <= tol && !(err_neg <= tol);
    char buf[256];
    snprintf(buf, sizeof buf, ", \"check_max_rel_err\": %.3e, \"negative_control_rel_err\": %.3e, \"tol\": %.1e, \"ok\": %s}",
             err, err_neg, tol, ok ? "true" : "false");
    out += buf;
    printf("%s\n", out.c_str());

    ggml_gallocr_free(ga);
    ggml_gallocr_free(gap);
    ggml_free(gctx);
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    ggml_backend_free(be);
    std::remove(wpath.c_str());
    return ok ? 0 : 1;
}
