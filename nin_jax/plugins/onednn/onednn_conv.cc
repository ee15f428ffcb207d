// oneDNN convolutions for XLA's CPU backend, called through the XLA FFI.
//
// Three handlers (forward, input gradient, weight gradient) of a stride-1
// convolution with symmetric zero padding, float32 or bfloat16; x is
// [N, H, W, C] and w is [KH, KW, C, O], the layouts of flax's nn.Conv.
// setup.py compiles this file when nin-jax is installed; __init__.py beside it
// loads it and makes each handler a JAX primitive whose transposes are the
// other two.
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <string>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>
#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

struct Key {
  int64_t n, h, w, ci, co, kh, kw, pad;
  dt type;
  bool operator<(const Key& o) const {
    return std::tie(n, h, w, ci, co, kh, kw, pad, type) <
           std::tie(o.n, o.h, o.w, o.ci, o.co, o.kh, o.kw, o.pad, o.type);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

struct Conv {
  memory::desc src, dst, wei_user;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_wei_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_wei;
  dnnl::reorder to_fwd_wei, to_bwd_wei, from_diff_wei;

  explicit Conv(const Key& k) {
    auto& eng = Engine();
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    memory::dims strides = {1, 1}, pad = {k.pad, k.pad};
    int64_t oh = k.h + 2 * k.pad - k.kh + 1, ow = k.w + 2 * k.pad - k.kw + 1;
    src = memory::desc({k.n, k.ci, k.h, k.w}, k.type, tag::nhwc);
    dst = memory::desc({k.n, k.co, oh, ow}, k.type, tag::nhwc);
    memory::dims wd = {k.co, k.ci, k.kh, k.kw};
    wei_user = memory::desc(wd, k.type, tag::hwio);
    memory::desc wei_any(wd, k.type, tag::any);
    auto algo = dnnl::algorithm::convolution_direct;
    fwd_pd = dnnl::convolution_forward::primitive_desc(
        eng, dnnl::prop_kind::forward_training, algo, src, wei_any, dst,
        strides, pad, pad, attr);
    bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
        eng, algo, src, wei_any, dst, strides, pad, pad, fwd_pd, attr);
    bwd_wei_pd = dnnl::convolution_backward_weights::primitive_desc(
        eng, algo, src, wei_any, dst, strides, pad, pad, fwd_pd, attr);
    fwd = dnnl::convolution_forward(fwd_pd);
    bwd_data = dnnl::convolution_backward_data(bwd_data_pd);
    bwd_wei = dnnl::convolution_backward_weights(bwd_wei_pd);
    dnnl::primitive_attr rattr;
    rattr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    to_fwd_wei = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, wei_user, eng, fwd_pd.weights_desc(), rattr));
    to_bwd_wei = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, wei_user, eng, bwd_data_pd.weights_desc(), rattr));
    from_diff_wei = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, bwd_wei_pd.diff_weights_desc(), eng, wei_user, rattr));
  }
};

// Primitives are built once per shape and shared; execution is thread safe
// because every call brings its own scratchpad.
Conv& GetConv(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[k];
  if (!slot) slot = std::make_unique<Conv>(k);
  return *slot;
}

struct Scratch {
  std::vector<uint8_t> pad, weights;
  uint8_t* Pad(size_t n) { if (pad.size() < n) pad.resize(n); return pad.data(); }
  uint8_t* Weights(size_t n) { if (weights.size() < n) weights.resize(n); return weights.data(); }
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

dnnl::memory ScratchMem(const dnnl::memory::desc& md, uint8_t* p) {
  return dnnl::memory(md, Engine(), p);
}

template <typename PD>
void Run(const dnnl::primitive& prim, const PD& pd,
         std::unordered_map<int, dnnl::memory> args, uint8_t* scratch) {
  args.insert({DNNL_ARG_SCRATCHPAD, ScratchMem(pd.scratchpad_desc(), scratch)});
  dnnl::stream s(Engine());
  prim.execute(s, args);
  s.wait();
}

void Reorder(const dnnl::reorder& r, dnnl::memory& from, dnnl::memory& to) {
  dnnl::stream s(Engine());
  r.execute(s, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
  s.wait();
}

Key MakeKey(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
            int64_t pad, dt type) {
  return Key{x[0], x[1], x[2], x[3], w[3], w[0], w[1], pad, type};
}

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w) {
  if (x.size() != 4 || w.size() != 4 || x[3] != w[2])
    return ffi::Error::InvalidArgument(
        "nin_conv: expected x [N, H, W, C] and w [KH, KW, C, O]");
  return ffi::Error::Success();
}

// float32 and bfloat16 run in oneDNN; all operands share one type.
ffi::Error Type(std::initializer_list<ffi::DataType> types, dt* out) {
  ffi::DataType first = *types.begin();
  for (auto t : types)
    if (t != first)
      return ffi::Error::InvalidArgument("nin_conv: mixed operand types");
  if (first == ffi::DataType::F32) { *out = dt::f32; return ffi::Error::Success(); }
  if (first == ffi::DataType::BF16) { *out = dt::bf16; return ffi::Error::Success(); }
  return ffi::Error::InvalidArgument("nin_conv: only float32 and bfloat16");
}

// Checks the operands, sets this thread's oneDNN thread count and finds the
// primitives for input dims `xd` and weight dims `wd`.
ffi::Error Prepare(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd,
                   std::initializer_list<ffi::DataType> types, int64_t pad,
                   int64_t threads, Conv** conv) {
  if (auto e = CheckShapes(xd, wd); e.failure()) return e;
  dt type;
  if (auto e = Type(types, &type); e.failure()) return e;
  omp_set_num_threads(static_cast<int>(threads));
  *conv = &GetConv(MakeKey(xd, wd, pad, type));
  return ffi::Error::Success();
}

// The HWIO weights at `data` reordered by `r` into the primitive's layout `md`.
dnnl::memory BlockedWeights(const Conv& c, const dnnl::reorder& r,
                            const memory::desc& md, void* data, Scratch& s) {
  dnnl::memory user(c.wei_user, Engine(), data);
  dnnl::memory blocked(md, Engine(), s.Weights(md.get_size()));
  Reorder(r, user, blocked);
  return blocked;
}

}  // namespace

// y = conv(x, w), stride 1, symmetric zero padding `pad`; NHWC / HWIO.
static ffi::Error ConvForwardUnsafe(ffi::AnyBuffer x, ffi::AnyBuffer w,
                                    ffi::Result<ffi::AnyBuffer> y, int64_t pad,
                                    int64_t threads) {
  Conv* c;
  if (auto e = Prepare(x.dimensions(), w.dimensions(),
                       {x.element_type(), w.element_type(), y->element_type()},
                       pad, threads, &c);
      e.failure())
    return e;
  auto& s = ThreadScratch();
  auto& eng = Engine();
  Run(c->fwd, c->fwd_pd,
      {{DNNL_ARG_SRC, dnnl::memory(c->src, eng, x.untyped_data())},
       {DNNL_ARG_WEIGHTS, BlockedWeights(*c, c->to_fwd_wei,
                                         c->fwd_pd.weights_desc(),
                                         w.untyped_data(), s)},
       {DNNL_ARG_DST, dnnl::memory(c->dst, eng, y->untyped_data())}},
      s.Pad(c->fwd_pd.scratchpad_desc().get_size()));
  return ffi::Error::Success();
}

// dx = the input gradient of conv(x, w) for output gradient dy.
static ffi::Error ConvBackwardDataUnsafe(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                                         ffi::Result<ffi::AnyBuffer> dx,
                                         int64_t pad, int64_t threads) {
  Conv* c;
  if (auto e = Prepare(dx->dimensions(), w.dimensions(),
                       {dy.element_type(), w.element_type(), dx->element_type()},
                       pad, threads, &c);
      e.failure())
    return e;
  auto& s = ThreadScratch();
  auto& eng = Engine();
  Run(c->bwd_data, c->bwd_data_pd,
      {{DNNL_ARG_DIFF_DST, dnnl::memory(c->dst, eng, dy.untyped_data())},
       {DNNL_ARG_WEIGHTS, BlockedWeights(*c, c->to_bwd_wei,
                                         c->bwd_data_pd.weights_desc(),
                                         w.untyped_data(), s)},
       {DNNL_ARG_DIFF_SRC, dnnl::memory(c->src, eng, dx->untyped_data())}},
      s.Pad(c->bwd_data_pd.scratchpad_desc().get_size()));
  return ffi::Error::Success();
}

// dw = the weight gradient of conv(x, w) for output gradient dy.
static ffi::Error ConvBackwardWeightsUnsafe(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                            ffi::Result<ffi::AnyBuffer> dw,
                                            int64_t pad, int64_t threads) {
  Conv* c;
  if (auto e = Prepare(x.dimensions(), dw->dimensions(),
                       {x.element_type(), dy.element_type(), dw->element_type()},
                       pad, threads, &c);
      e.failure())
    return e;
  auto& s = ThreadScratch();
  auto& eng = Engine();
  auto wmd = c->bwd_wei_pd.diff_weights_desc();
  dnnl::memory blocked(wmd, eng, s.Weights(wmd.get_size()));
  Run(c->bwd_wei, c->bwd_wei_pd,
      {{DNNL_ARG_SRC, dnnl::memory(c->src, eng, x.untyped_data())},
       {DNNL_ARG_DIFF_DST, dnnl::memory(c->dst, eng, dy.untyped_data())},
       {DNNL_ARG_DIFF_WEIGHTS, blocked}},
      s.Pad(c->bwd_wei_pd.scratchpad_desc().get_size()));
  dnnl::memory user(c->wei_user, eng, dw->untyped_data());
  Reorder(c->from_diff_wei, blocked, user);
  return ffi::Error::Success();
}

// oneDNN reports failures (e.g. out of memory) as exceptions, which must not
// cross the FFI boundary.
using Handler = ffi::Error (*)(ffi::AnyBuffer, ffi::AnyBuffer,
                               ffi::Result<ffi::AnyBuffer>, int64_t, int64_t);

template <Handler F>
ffi::Error Guarded(ffi::AnyBuffer a, ffi::AnyBuffer b,
                   ffi::Result<ffi::AnyBuffer> out, int64_t pad,
                   int64_t threads) {
  try {
    return F(a, b, out, pad, threads);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("nin_conv: ") + e.what());
  }
}

// All three handlers take two arrays, return one, and read `pad`, `threads`.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("pad")
      .Attr<int64_t>("threads");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvForward, Guarded<ConvForwardUnsafe>,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvBackwardData,
                              Guarded<ConvBackwardDataUnsafe>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NinConvBackwardWeights,
                              Guarded<ConvBackwardWeightsUnsafe>, Binding());

// 1 if oneDNN can build this file's convolutions for `type` (a dnnl data type)
// on this CPU, else 0: bfloat16 needs AVX-512 or AVX2-VNNI-2, and a CPU
// without them fails only when the primitive is created.
extern "C" int NinConvSupports(int type) {
  try {
    Conv probe(Key{2, 4, 4, 8, 8, 3, 3, 1, static_cast<dt>(type)});
    return 1;
  } catch (...) {
    return 0;
  }
}

// The oneDNN version (major * 10000 + minor * 100 + patch) this file was
// compiled against, and the one of the libdnnl it runs with: __init__.py
// refuses a library whose major.minor differs from the headers'.
extern "C" int NinConvBuiltWithVersion() {
  return DNNL_VERSION_MAJOR * 10000 + DNNL_VERSION_MINOR * 100 +
         DNNL_VERSION_PATCH;
}

extern "C" int NinConvRuntimeVersion() {
  const dnnl_version_t* v = dnnl::version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
