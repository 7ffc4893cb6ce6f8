// C++ test of the infinitehip bridge, compiled with g++ against the static
// library (see tests/cpp_bridge.rs). Happy paths are checked against a plain
// C++ double-precision attention; error paths must arrive as rust::Error
// exceptions carrying the Rust message.
#include "infinitehip-cpp-bridge/src/lib.rs.h"
#include "rust/cxx.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using namespace infinitehip;

static int failures = 0;
#define CHECK(cond, ...)                                      \
    do {                                                      \
        if (!(cond)) {                                        \
            std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            std::fprintf(stderr, __VA_ARGS__);                \
            std::fprintf(stderr, "\n");                       \
            failures++;                                       \
        }                                                     \
    } while (0)

constexpr int HQ = 4, HKV = 2, D = 16, G = HQ / HKV;

static const char * CONFIG = R"({
  "model": {"n_layers": 2, "n_q_heads": 4, "n_kv_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "max_position": 4096},
  "kv": {"page_size": 16, "dtype": "f32"},
  "dense_layers": 1,
  "default": {"method": "hip", "sink": 4, "window": 8,
              "stages": [{"chunk_size": 4, "keep_tokens": 1024, "refresh_interval": 1}],
              "block_size_q": 8, "q_stride": 1, "prefill_chunk": 64}
})";

// Query i of n (cache positions len-n+i) attends tokens 0..=len-n+i.
static std::vector<double> reference(const std::vector<float> & q, int n, const std::vector<float> & k,
                                     const std::vector<float> & v, int len) {
    std::vector<double> out(q.size(), 0.0);
    const double scale = 1.0 / std::sqrt((double) D);
    for (int i = 0; i < n; i++) {
        int end = len - n + i + 1;
        for (int hq = 0; hq < HQ; hq++) {
            int h = hq / G;
            const float * qh = &q[(i * HQ + hq) * D];
            std::vector<double> s(end);
            double m = -INFINITY;
            for (int t = 0; t < end; t++) {
                double acc = 0;
                for (int j = 0; j < D; j++) acc += (double) qh[j] * k[(t * HKV + h) * D + j];
                s[t] = acc * scale;
                m = std::max(m, s[t]);
            }
            double l = 0;
            for (int t = 0; t < end; t++) l += std::exp(s[t] - m);
            double * o = &out[(i * HQ + hq) * D];
            for (int t = 0; t < end; t++) {
                double w = std::exp(s[t] - m) / l;
                for (int j = 0; j < D; j++) o[j] += w * v[(t * HKV + h) * D + j];
            }
        }
    }
    return out;
}

static double rel_err(const std::vector<float> & a, const std::vector<double> & b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        double d = a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    return std::isnan(num) ? NAN : std::sqrt(num / std::max(den, 1e-300));
}

// Runs f, expecting a rust::Error whose message contains `needle`.
static void expect_error(const char * what, const std::string & needle, const std::function<void()> & f) {
    try {
        f();
        CHECK(false, "%s: no exception", what);
    } catch (const rust::Error & e) {
        CHECK(std::string(e.what()).find(needle) != std::string::npos, "%s: message '%s' lacks '%s'", what,
              e.what(), needle.c_str());
    }
}

static uint16_t to_half(float f) {
    // Round-to-nearest-even float -> IEEE half for normal finite values in range (enough for N(0,1) data).
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    int32_t exp = ((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (exp <= 0) return (uint16_t) sign;  // flush tiny values
    uint32_t h = sign | (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t) h;
}
static float from_half(uint16_t h) {
    uint32_t sign = (h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    if (exp == 0) return sign ? -0.0f : 0.0f;
    uint32_t x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

int main() {
    std::mt19937 gen(7);
    std::normal_distribution<float> N(0.f, 1.f);
    auto randv = [&](size_t n) {
        std::vector<float> x(n);
        for (auto & a : x) a = N(gen);
        return x;
    };

    // ---- Engine: happy path ----
    rust::Box<EngineHandle> eng = engine_new(CONFIG);
    CHECK(eng->n_layers() == 2, "n_layers %zu", eng->n_layers());
    const int len = 100, te = HKV * D, qe = HQ * D;
    std::vector<float> k = randv(len * te), v = randv(len * te);
    eng->add_sequence(1);
    for (size_t l = 0; l < 2; l++) {
        eng->append_f32(l, 1, rust::Slice<const float>(k.data(), (len - 1) * te),
                        rust::Slice<const float>(v.data(), (len - 1) * te), false, true);
    }
    CHECK(eng->seq_len(1, 1) == (size_t) len - 1, "seq_len %zu", eng->seq_len(1, 1));

    // Prefill of the last 40 of 99 tokens, both layers (dense and full-budget hip).
    const int n = 40;
    std::vector<float> q = randv(n * qe), out(n * qe);
    std::vector<float> kk(k.begin(), k.begin() + (len - 1) * te), vv(v.begin(), v.begin() + (len - 1) * te);
    auto want = reference(q, n, kk, vv, len - 1);
    for (size_t l = 0; l < 2; l++) {
        std::fill(out.begin(), out.end(), NAN);
        eng->attend_prefill(l, 1, rust::Slice<const float>(q.data(), q.size()), rust::Slice<float>(out.data(), out.size()));
        double e = rel_err(out, want);
        CHECK(e < 1e-5, "prefill layer %zu rel err %g", l, e);
    }

    // Decode: one more token, then a batch of the sequence and its fork.
    for (size_t l = 0; l < 2; l++) {
        eng->append_f32(l, 1, rust::Slice<const float>(k.data() + (len - 1) * te, te),
                        rust::Slice<const float>(v.data() + (len - 1) * te, te), true, true);
    }
    eng->fork_sequence(1, 2);
    std::vector<float> qd = randv(qe);
    std::vector<float> q2(qd);
    q2.insert(q2.end(), qd.begin(), qd.end());
    std::vector<float> out2(2 * qe);
    uint64_t seqs[2] = {1, 2};
    auto wantd = reference(qd, 1, k, v, len);
    for (size_t l = 0; l < 2; l++) {
        eng->attend_decode(l, rust::Slice<const uint64_t>(seqs, 2), rust::Slice<const float>(q2.data(), q2.size()),
                           rust::Slice<float>(out2.data(), out2.size()));
        std::vector<float> a(out2.begin(), out2.begin() + qe), b(out2.begin() + qe, out2.end());
        CHECK(rel_err(a, wantd) < 1e-5 && rel_err(b, wantd) < 1e-5, "decode layer %zu rel err %g / %g", l,
              rel_err(a, wantd), rel_err(b, wantd));
    }

    // f16 storage path: the same K/V as half bits, attended against the rounded reference.
    std::vector<uint16_t> kh(k.size()), vh(v.size());
    std::vector<float> kr(k.size()), vr(v.size());
    for (size_t i = 0; i < k.size(); i++) {
        kh[i] = to_half(k[i]); kr[i] = from_half(kh[i]);
        vh[i] = to_half(v[i]); vr[i] = from_half(vh[i]);
    }
    eng->add_sequence(3);
    for (size_t l = 0; l < 2; l++) {
        eng->append_f16(l, 3, rust::Slice<const uint16_t>(kh.data(), kh.size()),
                        rust::Slice<const uint16_t>(vh.data(), vh.size()), false, true);
    }
    auto wanth = reference(qd, 1, kr, vr, len);
    uint64_t s3 = 3;
    std::vector<float> out3(qe);
    eng->attend_decode(1, rust::Slice<const uint64_t>(&s3, 1), rust::Slice<const float>(qd.data(), qe),
                       rust::Slice<float>(out3.data(), qe));
    CHECK(rel_err(out3, wanth) < 1e-5, "f16 decode rel err %g", rel_err(out3, wanth));

    // read: the sequence's K/V round-trips exactly (f32 storage).
    {
        std::vector<float> rk(len * te), rv(len * te);
        eng->read(1, 1, 0, len, rust::Slice<float>(rk.data(), rk.size()), rust::Slice<float>(rv.data(), rv.size()));
        CHECK(rk == k && rv == v, "read did not return the appended K/V");
        eng->evict(1, 1);  // hip owes no eviction: a no-op that must not fail
        CHECK(eng->seq_len(1, 1) == (size_t) len, "evict changed a hip sequence");
        expect_error("read range", "", [&] {
            eng->read(1, 1, 0, len + 5, rust::Slice<float>(rk.data(), rk.size()), rust::Slice<float>(rv.data(), rv.size()));
        });
        expect_error("read buffer size", "read k/v buffers", [&] {
            eng->read(1, 1, 0, 2, rust::Slice<float>(rk.data(), rk.size()), rust::Slice<float>(rv.data(), rv.size()));
        });
    }
    std::string stats(eng->stats_json());
    CHECK(stats.find("\"method\":\"hip\"") != std::string::npos && stats.find("\"sequences\":3") != std::string::npos,
          "stats %s", stats.c_str());
    eng->free_sequence(2);
    CHECK(std::string(eng->stats_json()).find("\"sequences\":2") != std::string::npos, "free did not drop a sequence");
    CHECK(std::string(default_config_json()).find("\"hip\"") != std::string::npos, "default config");

    // ---- Engine: error paths ----
    expect_error("malformed json", "not valid JSON", [] { engine_new("{not json"); });
    expect_error("bad field", "model.n_q_heads", [] { engine_new(R"({"model": {"n_q_heads": 6, "n_kv_heads": 4}})"); });
    expect_error("duplicate seq", "already exists", [&] { eng->add_sequence(1); });
    expect_error("unknown seq", "unknown sequence id 99", [&] {
        std::vector<float> o(qe);
        uint64_t s = 99;
        eng->attend_decode(1, rust::Slice<const uint64_t>(&s, 1), rust::Slice<const float>(qd.data(), qe),
                           rust::Slice<float>(o.data(), qe));
    });
    expect_error("append shape", "append K/V", [&] {
        eng->append_f32(0, 1, rust::Slice<const float>(k.data(), te + 1), rust::Slice<const float>(v.data(), te + 1), true, true);
    });
    expect_error("layer range", "layer 5", [&] {
        eng->append_f32(5, 1, rust::Slice<const float>(k.data(), te), rust::Slice<const float>(v.data(), te), true, true);
    });
    expect_error("decode q shape", "decode q/out", [&] {
        std::vector<float> o(qe);
        eng->attend_decode(1, rust::Slice<const uint64_t>(seqs, 2), rust::Slice<const float>(qd.data(), qe),
                           rust::Slice<float>(o.data(), qe));
    });
    // The engine still works after errors.
    eng->attend_decode(1, rust::Slice<const uint64_t>(&s3, 1), rust::Slice<const float>(qd.data(), qe),
                       rust::Slice<float>(out3.data(), qe));

    // ---- llama.cpp plugin surface ----
    ModelInfo mi{2, HQ, HKV, D, 10000.f, 4096};
    rust::Box<LlamaPlugin> p = llama_plugin_new(R"({"dense_layers": 1})", mi);
    CHECK(std::string(p->layer_method(0)) == "dense" && std::string(p->layer_method(1)) == "hip", "methods");
    CHECK(std::string(p->summary()).find("layers") == std::string::npos, "summary %s", std::string(p->summary()).c_str());
    expect_error("plugin shape", "model.head_dim", [&] { llama_plugin_new(R"({"model": {"head_dim": 8}})", mi); });
    expect_error("plugin layer", "layer 9", [&] { p->layer_method(9); });
    // One decode over llama.cpp-layout buffers: K f32 [d, hkv, n_kv], V
    // transposed [n_kv, hkv, d], mask row 0 = the first `len` cells.
    const int kv_size = 128, nkv = 112;
    std::vector<float> Kc = randv(kv_size * te), Vt(kv_size * te);
    std::vector<float> Vc = randv(kv_size * te);
    for (int c = 0; c < kv_size; c++)
        for (int hj = 0; hj < te; hj++) Vt[hj * kv_size + c] = Vc[c * te + hj];
    std::vector<float> mask(nkv * 2, -INFINITY);
    for (int c = 0; c < len; c++) mask[c] = 0.f;
    TensorDesc qdsc{0, D, HQ, 1, 1, 4, 4 * D, 4 * qe, 4 * qe};
    TensorDesc kdsc{0, D, HKV, nkv, 1, 4, 4 * D, 4 * (uint64_t) te, 4 * (uint64_t) te * kv_size};
    TensorDesc vdsc{0, nkv, HKV, D, 1, 4, 4 * (uint64_t) kv_size * D, 4 * (uint64_t) kv_size, 4 * (uint64_t) kv_size * te};
    TensorDesc mdsc{0, nkv, 2, 1, 1, 4, 4 * (uint64_t) nkv, 4 * (uint64_t) nkv * 2, 4 * (uint64_t) nkv * 2};
    auto bytes = [](const std::vector<float> & x) {
        return rust::Slice<const uint8_t>((const uint8_t *) x.data(), x.size() * 4);
    };
    p->plan(1, 0.25f, bytes(qd), qdsc, bytes(Kc), kdsc, bytes(Vt), vdsc, true, bytes(mask), mdsc);
    std::vector<float> po(qe, NAN);
    // Two "threads": items 0..1 and 1..2 (one per KV head).
    p->attend(1, 0, 1, 0.25f, bytes(qd), qdsc, bytes(Kc), kdsc, bytes(Vt), vdsc, true, bytes(mask), mdsc,
              rust::Slice<float>(po.data(), G * D));
    p->attend(1, 1, 2, 0.25f, bytes(qd), qdsc, bytes(Kc), kdsc, bytes(Vt), vdsc, true, bytes(mask), mdsc,
              rust::Slice<float>(po.data() + G * D, G * D));
    std::vector<float> Kl(Kc.begin(), Kc.begin() + len * te), Vl(Vc.begin(), Vc.begin() + len * te);
    auto wantp = reference(qd, 1, Kl, Vl, len);
    CHECK(rel_err(po, wantp) < 1e-5, "plugin decode rel err %g", rel_err(po, wantp));
    CHECK(std::string(p->stats_json()).find("\"sparse_streams\":1") != std::string::npos, "plugin stats %s",
          std::string(p->stats_json()).c_str());
    expect_error("plugin short buffer", "k buffer", [&] {
        p->plan(1, 0.25f, bytes(qd), qdsc, rust::Slice<const uint8_t>((const uint8_t *) Kc.data(), 64), kdsc,
                bytes(Vt), vdsc, true, bytes(mask), mdsc);
    });
    expect_error("plugin dense layer", "dense", [&] {
        p->plan(0, 0.25f, bytes(qd), qdsc, bytes(Kc), kdsc, bytes(Vt), vdsc, true, bytes(mask), mdsc);
    });
    // Locret surface (llama.cpp cell eviction): off without locret layers,
    // its calls are errors then; a missing weights file names the field.
    CHECK(!p->locret_on() && !p->locret_layer(1), "locret off for a hip config");
    expect_error("locret begin without locret", "no layer runs locret", [&] {
        const int32_t pos[1] = {0};
        const uint32_t n_seq[1] = {1};
        p->locret_begin(rust::Slice<const int32_t>(pos, 1), rust::Slice<const uint32_t>(n_seq, 1),
                        rust::Slice<const int32_t>(pos, 1));
    });
    expect_error("locret weights", "locret.weights", [&] {
        llama_plugin_new(R"({"dense_layers": 0, "default": {"method": "locret", "weights": "/nonexistent/w.safetensors"}})",
                         mi);
    });

    if (failures) {
        std::fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    std::printf("bridge_test: all checks passed\n");
    return 0;
}
