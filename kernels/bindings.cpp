// The only file that knows Python (STYLE §6): checks buffer sizes against the shapes, releases the GIL,
// then calls the torch-free core. Uses the CPython C API and the buffer protocol only (no build-time deps).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <vector>

#include "cpu/codec_cpu.h"
#include "cpu/transform.h"

namespace {

using cachegen::LevelDesc;

struct Buffers {  // releases every Py_buffer it acquired
  std::vector<Py_buffer*> held;
  ~Buffers() { for (auto* b : held) PyBuffer_Release(b); }
};

bool need(bool ok, const char* what) {
  if (!ok) PyErr_SetString(PyExc_ValueError, what);
  return ok;
}

// desc = (layers, heads, num_tokens, per_token, alphabet, num_tables) plus table_map, freq, cum buffers.
bool parse_desc(PyObject* desc, Py_buffer* map, Py_buffer* freq, Py_buffer* cum, LevelDesc* d) {
  unsigned int layers, heads, tokens, per_token, alphabet, num_tables;
  if (!PyArg_ParseTuple(desc, "IIIIII", &layers, &heads, &tokens, &per_token, &alphabet, &num_tables)) return false;
  const uint64_t cells = uint64_t(layers) * 2 * heads * per_token;
  if (!need(alphabet >= 2 && alphabet <= 256 && per_token > 0 && tokens > 0, "bad level shape") ||
      !need(uint64_t(map->len) == cells * 4, "table_map size") ||
      !need(uint64_t(freq->len) == uint64_t(num_tables) * alphabet * 4 && cum->len == freq->len, "table size"))
    return false;
  const uint32_t* rows = static_cast<const uint32_t*>(map->buf);
  for (uint64_t i = 0; i < cells; ++i)
    if (!need(rows[i] < num_tables, "table_map entry out of range")) return false;
  *d = LevelDesc{layers, heads, tokens, per_token, rows, num_tables,
                 {static_cast<const uint32_t*>(freq->buf), static_cast<const uint32_t*>(cum->buf), alphabet}};
  return true;
}

PyObject* status_tuple(cachegen::Status st, int64_t bad) { return Py_BuildValue("(iL)", int(st), (long long)bad); }

// Smallest and largest of n int8 or u32 values: plain reductions, so the check below vectorizes.
template <class T>
void min_max(const T* data, uint64_t n, int64_t* lo, int64_t* hi) {
  T a = data[0], b = data[0];
  for (uint64_t i = 1; i < n; ++i) {
    a = data[i] < a ? data[i] : a;
    b = data[i] > b ? data[i] : b;
  }
  *lo = a;
  *hi = b;
}

// Attach the optional token shifts (None, or (layers, num_tokens) int8 in `shift`) to d after checking their size
// and that every table index map + shift lies in [0, num_tables): each layer's map entries meet each of its
// shifts, so the extremes of both per layer decide.
bool attach_shift(PyObject* obj, Py_buffer* shift, Buffers& guard, LevelDesc* d) {
  if (obj == Py_None) return true;
  if (PyObject_GetBuffer(obj, shift, PyBUF_SIMPLE) != 0) return false;
  guard.held.push_back(shift);
  if (!need(uint64_t(shift->len) == uint64_t(d->layers) * d->num_tokens, "token_shift size")) return false;
  const int8_t* s = static_cast<const int8_t*>(shift->buf);
  const uint64_t cells = uint64_t(2) * d->heads * d->per_token;  // map entries of one layer
  for (uint32_t l = 0; l < d->layers && cells != 0; ++l) {  // (no heads: no symbols, so no index to check)
    int64_t map_lo, map_hi, shift_lo, shift_hi;
    min_max(d->table_map + l * cells, cells, &map_lo, &map_hi);
    min_max(s + uint64_t(l) * d->num_tokens, d->num_tokens, &shift_lo, &shift_hi);
    if (!need(map_lo + shift_lo >= 0 && map_hi + shift_hi < int64_t(d->num_tables), "token_shift table out of range"))
      return false;
  }
  d->token_shift = s;
  return true;
}

// encode_symbols(desc, table_map, freq, cum, symbols, threads[, token_shift]) -> (sizes: bytes, words: bytes)
PyObject* encode_symbols(PyObject*, PyObject* args) {
  PyObject *desc, *shift_obj = Py_None;
  Py_buffer map, freq, cum, sym, shift{};
  int threads;
  if (!PyArg_ParseTuple(args, "Oy*y*y*y*i|O", &desc, &map, &freq, &cum, &sym, &threads, &shift_obj)) return nullptr;
  Buffers guard{{&map, &freq, &cum, &sym}};
  LevelDesc d;
  if (!parse_desc(desc, &map, &freq, &cum, &d) || !attach_shift(shift_obj, &shift, guard, &d)) return nullptr;
  const uint64_t count = uint64_t(d.layers) * 2 * d.heads * d.num_tokens * d.per_token;
  if (!need(uint64_t(sym.len) == count * 4, "symbols size")) return nullptr;
  const int32_t* s = static_cast<const int32_t*>(sym.buf);
  for (uint64_t i = 0; i < count; ++i)
    if (!need(s[i] >= 0 && uint32_t(s[i]) < d.tables.alphabet, "symbol out of alphabet")) return nullptr;
  const uint64_t streams = cachegen::num_streams(d);
  std::vector<uint32_t> sizes(streams), words(streams * (uint64_t(cachegen::kStreamTokens) * d.per_token + 2));
  uint64_t total;
  Py_BEGIN_ALLOW_THREADS
  total = cachegen::encode_symbols_cpu(d, s, sizes.data(), words.data(), threads);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(y#y#)", reinterpret_cast<const char*>(sizes.data()), Py_ssize_t(streams * 4),
                       reinterpret_cast<const char*>(words.data()), Py_ssize_t(total * 4));
}

// Largest byte of `data`: a plain reduction, so the per-call check of every slot vectorizes (no early exit).
uint8_t max_byte(const uint8_t* data, Py_ssize_t len) {
  uint8_t top = 0;
  for (Py_ssize_t i = 0; i < len; ++i) top = data[i] > top ? data[i] : top;
  return top;
}

// Attach the runtime lookup (slots: (num_tables, 256) u8; bounds: (num_tables, alphabet + 2) u32) to d after
// checking its sizes and that every slot names a symbol; the bounds' values cannot move an index out of range.
bool attach_lookup(const Py_buffer& slots, const Py_buffer& bounds, LevelDesc* d) {
  if (!need(uint64_t(slots.len) == uint64_t(d->num_tables) * 256, "slots size") ||
      !need(uint64_t(bounds.len) == uint64_t(d->num_tables) * (d->tables.alphabet + 2) * 4, "bounds size") ||
      !need(max_byte(static_cast<const uint8_t*>(slots.buf), slots.len) < d->tables.alphabet, "slot out of range"))
    return false;
  d->tables.slots = static_cast<const uint8_t*>(slots.buf);
  d->tables.bounds = static_cast<const uint32_t*>(bounds.buf);
  return true;
}

// decode(desc, table_map, freq, cum, slots, bounds, words, sizes, scales|None, bins|None, out, mode, threads
//        [, token_shift|None[, simd]]) -> (status, first bad stream); slots and bounds: the lookup of
//        cachegen::TableSet.
// mode 0: int32 symbols into out; mode 1: fused 16-bit values (bf16 dequant when bins given, else bytes joined).
// token_shift (int8 (layers, num_tokens)): mode 0 only. simd (default true): false keeps to the portable lanes.
PyObject* decode(PyObject*, PyObject* args) {
  PyObject *desc, *scales_obj, *bins_obj, *shift_obj = Py_None;
  Py_buffer map, freq, cum, slots, bounds, words, sizes, out, scales{}, bins{}, shift{};
  int mode, threads, simd = 1;
  if (!PyArg_ParseTuple(args, "Oy*y*y*y*y*y*y*OOw*ii|Op", &desc, &map, &freq, &cum, &slots, &bounds, &words, &sizes,
                        &scales_obj, &bins_obj, &out, &mode, &threads, &shift_obj, &simd))
    return nullptr;
  Buffers guard{{&map, &freq, &cum, &slots, &bounds, &words, &sizes, &out}};
  LevelDesc d;
  if (!parse_desc(desc, &map, &freq, &cum, &d) || !attach_lookup(slots, bounds, &d) ||
      !need(shift_obj == Py_None || mode == 0, "token_shift decodes to symbols only (no fused mode)") ||
      !attach_shift(shift_obj, &shift, guard, &d))
    return nullptr;
  d.allow_simd = simd != 0;
  const bool is_quant = bins_obj != Py_None;
  if (is_quant) {
    if (PyObject_GetBuffer(scales_obj, &scales, PyBUF_SIMPLE) != 0) return nullptr;
    guard.held.push_back(&scales);
    if (PyObject_GetBuffer(bins_obj, &bins, PyBUF_SIMPLE) != 0) return nullptr;
    guard.held.push_back(&bins);
  }
  const uint64_t groups_tokens = uint64_t(d.layers) * 2 * d.heads * d.num_tokens;
  const uint64_t streams = cachegen::num_streams(d);
  if (!need(uint64_t(sizes.len) == streams * 4 && words.len % 4 == 0, "sizes/words size")) return nullptr;
  const uint64_t out_bytes = mode == 0 ? groups_tokens * d.per_token * 4 : groups_tokens * (is_quant ? d.per_token : d.per_token / 2) * 2;
  if (!need(uint64_t(out.len) == out_bytes, "out size") ||
      !need(!is_quant || (uint64_t(scales.len) == uint64_t(d.layers) * 2 * d.num_tokens * 2 &&
                          uint64_t(bins.len) == uint64_t(d.layers) * 4), "scales/bins size"))
    return nullptr;
  if (is_quant) {
    const uint16_t* b = static_cast<const uint16_t*>(bins.buf);
    for (uint32_t i = 0; i < d.layers * 2; ++i)
      if (!need(b[i] >= 4 && b[i] <= 256 && b[i] % 2 == 0 && b[i] - 1u <= d.tables.alphabet, "bins")) return nullptr;
  }
  int64_t bad = -1;
  cachegen::Status st;
  const uint32_t* w = static_cast<const uint32_t*>(words.buf);
  const uint32_t* z = static_cast<const uint32_t*>(sizes.buf);
  Py_BEGIN_ALLOW_THREADS
  if (mode == 0) st = cachegen::decode_symbols_cpu(d, w, words.len / 4, z, static_cast<int32_t*>(out.buf), threads, &bad);
  else st = cachegen::decode_values_cpu(d, w, words.len / 4, z, is_quant ? static_cast<const uint16_t*>(scales.buf) : nullptr,
                                        is_quant ? static_cast<const uint16_t*>(bins.buf) : nullptr,
                                        static_cast<uint16_t*>(out.buf), threads, &bad);
  Py_END_ALLOW_THREADS
  return status_tuple(st, bad);
}

// vector_lanes(desc, table_map, freq, cum, slots, bounds) -> bool: whether decode takes this unshifted level's runs
// of full blocks with the AVX-512 lanes on this CPU (cachegen::simd_decodes).
PyObject* vector_lanes(PyObject*, PyObject* args) {
  PyObject* desc;
  Py_buffer map, freq, cum, slots, bounds;
  if (!PyArg_ParseTuple(args, "Oy*y*y*y*y*", &desc, &map, &freq, &cum, &slots, &bounds)) return nullptr;
  Buffers guard{{&map, &freq, &cum, &slots, &bounds}};
  LevelDesc d;
  if (!parse_desc(desc, &map, &freq, &cum, &d) || !attach_lookup(slots, bounds, &d)) return nullptr;
  return PyBool_FromLong(cachegen::simd_decodes(d));
}

// inverse_transform((layers, heads, head_dim, num_tokens, token_start, is_bf16, threads), symbols, steps, mean,
//                   decode_matrix, inv_freq, classes|None, out) -> None: cachegen::inverse_transform_cpu, every
// buffer's size checked against the shape (float32 arrays, int32 symbols, uint8 classes < 16, 16-bit out).
PyObject* inverse_transform(PyObject*, PyObject* args) {
  unsigned int layers, heads, dim, tokens, start;
  int is_bf16, threads;
  PyObject* classes_obj;
  Py_buffer sym, steps, mean, matrix, freq, out, classes{};
  if (!PyArg_ParseTuple(args, "(IIIIIpi)y*y*y*y*y*Ow*", &layers, &heads, &dim, &tokens, &start, &is_bf16, &threads,
                        &sym, &steps, &mean, &matrix, &freq, &classes_obj, &out))
    return nullptr;
  Buffers guard{{&sym, &steps, &mean, &matrix, &freq, &out}};
  const uint64_t width = uint64_t(heads) * dim, groups = uint64_t(layers) * 2, values = groups * width * tokens;
  if (!need(layers > 0 && heads > 0 && dim > 0 && dim % 2 == 0 && tokens > 0, "bad transform shape") ||
      !need(uint64_t(sym.len) == values * 4 && uint64_t(out.len) == values * 2, "symbols/out size") ||
      !need(uint64_t(steps.len) == groups * width * 4 && uint64_t(mean.len) == groups * width * 4, "steps/mean size") ||
      !need(uint64_t(matrix.len) == groups * width * width * 4 && uint64_t(freq.len) == uint64_t(dim) * 2,
            "decode_matrix/inv_freq size"))
    return nullptr;
  const uint8_t* cls = nullptr;
  if (classes_obj != Py_None) {
    if (PyObject_GetBuffer(classes_obj, &classes, PyBUF_SIMPLE) != 0) return nullptr;
    guard.held.push_back(&classes);
    cls = static_cast<const uint8_t*>(classes.buf);
    if (!need(uint64_t(classes.len) == uint64_t(layers) * tokens, "classes size") ||
        !need(max_byte(cls, classes.len) < cachegen::kNumClasses, "class out of range"))
      return nullptr;
  }
  const cachegen::InverseTransform t{layers, heads, dim, tokens, start,
                                     static_cast<const float*>(steps.buf), static_cast<const float*>(mean.buf),
                                     static_cast<const float*>(matrix.buf), static_cast<const float*>(freq.buf),
                                     cls, is_bf16 != 0};
  Py_BEGIN_ALLOW_THREADS
  cachegen::inverse_transform_cpu(t, static_cast<const int32_t*>(sym.buf), static_cast<uint16_t*>(out.buf), threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"encode_symbols", encode_symbols, METH_VARARGS, "rANS-encode a frame's symbols (FORMAT.md §5.3)."},
    {"decode", decode, METH_VARARGS, "rANS-decode a frame's streams, optionally fused with dequantization."},
    {"vector_lanes", vector_lanes, METH_VARARGS, "Whether decode takes a level with the AVX-512 lanes here."},
    {"inverse_transform", inverse_transform, METH_VARARGS, "Levels 6-8: symbols to 16-bit KV (FORMAT.md §5.5)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "cachegen.codec._cpu", "cachegen CPU codec core", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu() {
  PyObject* m = PyModule_Create(&module);
  if (!m) return nullptr;
  PyModule_AddIntConstant(m, "MAGIC", cachegen::kMagic);
  PyModule_AddIntConstant(m, "FORMAT_VERSION", cachegen::kFormatVersion);
  PyModule_AddIntConstant(m, "PRECISION", cachegen::kPrecision);
  PyModule_AddIntConstant(m, "STREAM_TOKENS", cachegen::kStreamTokens);
  PyModule_AddIntConstant(m, "HEADER_SIZE", cachegen::kHeaderSize);
  PyModule_AddIntConstant(m, "HAS_TOKEN_SHIFT", 1);  // encode_symbols and decode take token_shift
  PyModule_AddIntConstant(m, "HAS_SIMD_DECODE", cachegen::has_simd_decode());  // this CPU runs lanes_avx512.h
  return m;
}
