// Reading and writing safetensors files (optional: needs nlohmann-json; the core headers do not
// include this one).
//
// The format: 8 bytes N (unsigned, little-endian), then N bytes of UTF-8 JSON starting with '{' (a
// writer may pad it with trailing spaces), then the data area. The JSON object maps each tensor name to
// {"dtype": "F32", "shape": [d0, d1, …], "data_offsets": [begin, end]}, with offsets in bytes relative to
// the start of the data area; the optional key "__metadata__" holds a string → string map. Tensor data is
// row-major and little-endian. The tensors' byte ranges must tile the data area exactly: no overlap, no
// gap, nothing after the last one.
//
// Everything is checked before any tensor byte is read: the header length against the file size (and a
// 100 MB cap), UTF-8 and JSON validity, duplicate keys at any depth, each entry's fields and types, known
// dtypes, shape × dtype size == end − begin (with overflow checks), and the tiling of the data area. A file
// that fails a check raises io::format_error, whose message names the file and, where there is one, the
// tensor; no check reads outside the bytes it was given.
//
// Loading converts F64, F32, F16 and BF16 data to the requested floating-point T (F16 and BF16 through
// Eigen::half and Eigen::bfloat16, exactly). Other dtypes of the format (BOOL, U8 … U64, I8 … I64, F8_E5M2,
// F8_E4M3) are valid in a file and can be copied raw, but not loaded as floating point. Saving writes F32
// or F64 (the tensor's own type by default) or, when asked, F16 / BF16, rounded once to nearest-even.
//
// Example:
//   namespace io = tensor_adapters::io;
//   io::safetensors_file f = io::read_safetensors("model.safetensors");  // or map_safetensors: read on use
//   tensor_adapters::tensor<float, 2> w = f.load<float, 2>("layer.weight");
//   io::safetensors_writer out;
//   out.add("layer.weight", w);                       // F32
//   out.add("layer.weight_half", w, io::dtype::F16);  // rounded once to nearest-even
//   out.write("out.safetensors");
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

#include "../detail/check.hpp"
#include "../error.hpp"
#include "../tensor.hpp"

namespace tensor_adapters::io {

// A file or a tensor in it that cannot be read or written as asked. Derived from argument_error (and so
// from std::invalid_argument); the message names the file and, where there is one, the tensor.
class format_error : public argument_error {
 public:
  using argument_error::argument_error;
};

// Every dtype of the safetensors format this reader knows. Only F64, F32, F16 and BF16 load as floating
// point; the others can be copied raw.
enum class dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

// Bytes per element.
inline std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::BOOL: case dtype::U8: case dtype::I8: case dtype::F8_E5M2: case dtype::F8_E4M3: return 1;
    case dtype::I16: case dtype::U16: case dtype::F16: case dtype::BF16: return 2;
    case dtype::I32: case dtype::U32: case dtype::F32: return 4;
    case dtype::I64: case dtype::U64: case dtype::F64: return 8;
  }
  return 0;
}

inline const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::BOOL: return "BOOL";
    case dtype::U8: return "U8";
    case dtype::I8: return "I8";
    case dtype::F8_E5M2: return "F8_E5M2";
    case dtype::F8_E4M3: return "F8_E4M3";
    case dtype::I16: return "I16";
    case dtype::U16: return "U16";
    case dtype::F16: return "F16";
    case dtype::BF16: return "BF16";
    case dtype::I32: return "I32";
    case dtype::U32: return "U32";
    case dtype::F32: return "F32";
    case dtype::I64: return "I64";
    case dtype::U64: return "U64";
    case dtype::F64: return "F64";
  }
  return "?";
}

// The dtype named `name` ("F32", …); false if the name is not one of the format's dtypes.
inline bool parse_dtype(const std::string& name, dtype& out) {
  static const dtype all[] = {dtype::BOOL, dtype::U8,   dtype::I8,  dtype::F8_E5M2, dtype::F8_E4M3,
                              dtype::I16,  dtype::U16,  dtype::F16, dtype::BF16,    dtype::I32,
                              dtype::U32,  dtype::F32,  dtype::I64, dtype::U64,     dtype::F64};
  for (dtype t : all)
    if (name == dtype_name(t)) return out = t, true;
  return false;
}

// True for the dtypes that load as floating point: F64, F32, F16, BF16.
inline bool is_floating(dtype t) {
  return t == dtype::F64 || t == dtype::F32 || t == dtype::F16 || t == dtype::BF16;
}

// The dtype a tensor of element type T is saved as by default.
template <class T>
constexpr dtype dtype_of() {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value ||
                    std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value,
                "safetensors tensors are float, double, Eigen::half or Eigen::bfloat16");
  return std::is_same<T, double>::value  ? dtype::F64
         : std::is_same<T, float>::value ? dtype::F32
         : std::is_same<T, Eigen::half>::value ? dtype::F16
                                               : dtype::BF16;
}

// One tensor's entry in the header. begin and end are byte offsets into the data area.
struct tensor_info {
  std::string name;
  dtype type = dtype::F32;
  std::vector<index> shape;  // outermost first; empty for a scalar
  std::uint64_t begin = 0, end = 0;

  index size() const {
    index n = 1;
    for (index d : shape) n *= d;
    return n;
  }
};

// The deepest nesting of JSON arrays and objects accepted in a header or an adapter config (theirs is at
// most 4).
inline constexpr int max_json_depth = 64;

namespace detail {

// The largest header accepted, as the format's reference implementation does.
constexpr std::uint64_t max_header_size = 100000000;

[[noreturn]] inline void fail(const std::string& file, const std::string& message) {
  throw format_error("safetensors " + file + ": " + message);
}

inline std::string shape_text(const std::vector<index>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

// True if [p, p + n) is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
inline bool valid_utf8(const unsigned char* p, std::size_t n) {
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F, min = 0x800;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07, min = 0x10000;
    else return false;
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const unsigned cc = p[i + k];
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// Parses JSON text, rejecting invalid UTF-8, a NUL byte (never valid JSON; the parser would stop at it
// and ignore the rest), invalid JSON, arrays and objects nested more than
// max_json_depth deep (the parsed tree is later printed and compared by recursive code) and a key
// repeated within one object (at any depth). Objects keep their keys in file order. `what` names the
// text in messages.
inline nlohmann::ordered_json parse_json_strict(const char* text, std::size_t size, const std::string& what) {
  if (!valid_utf8(reinterpret_cast<const unsigned char*>(text), size))
    throw format_error(what + ": the JSON text is not valid UTF-8");
  if (std::memchr(text, '\0', size)) throw format_error(what + ": the JSON text holds a NUL byte");
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  auto callback = [&](int depth, nlohmann::ordered_json::parse_event_t event, nlohmann::ordered_json& parsed) {
    using event_t = nlohmann::ordered_json::parse_event_t;
    if ((event == event_t::object_start || event == event_t::array_start) && depth >= max_json_depth)
      throw format_error(what + ": arrays and objects are nested more than " + std::to_string(max_json_depth) +
                         " deep");
    if (event == event_t::object_start) {
      keys.emplace_back();
    } else if (event == event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == event_t::key && !keys.empty() && parsed.is_string()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(text, text + size, callback, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::exception& e) {
    throw format_error(what + ": invalid JSON (" + e.what() + ")");
  }
  if (!duplicate.empty()) throw format_error(what + ": the key \"" + duplicate + "\" appears twice in one object");
  return j;
}

// `text` cut to at most `size` bytes (then ending in "..."), not inside a UTF-8 sequence.
inline std::string excerpt(const std::string& text, std::size_t size) {
  if (text.size() <= size) return text;
  std::size_t cut = size - 3;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut) + "...";
}

// A JSON value as text for a message: its compact dump, cut to about 80 bytes.
inline std::string json_excerpt(const nlohmann::ordered_json& v) {
  return excerpt(v.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace), 80);
}

// out = a · b; true (out not written) on overflow of uint64.
inline bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  out = a * b;
  return false;
}

// A tensor's size in bytes, into `bytes`; true (bytes not written) if a tensor of this shape and dtype
// cannot exist: an extent below 0, the nonzero extents' product beyond an index
// (tensor_adapters::detail::extents_fit), or the size in bytes beyond uint64.
inline bool shape_overflows(const std::vector<index>& shape, dtype type, std::uint64_t& bytes) {
  if (!tensor_adapters::detail::extents_fit(shape, static_cast<int>(shape.size()))) return true;
  std::uint64_t elements = 1;  // exact: 0 with an empty extent, else at most an index
  for (const index d : shape) elements *= static_cast<std::uint64_t>(d);
  return mul_overflows(elements, dtype_size(type), bytes);
}

// Files are replaced through a temporary file beside them (`path` + ".partial"), renamed over `path` once
// complete: a write that fails (a full disk, a size limit) leaves `path` as it was and no partial file
// behind. The rename replaces the file in one step for other processes; it does not flush the data to the
// device. Errors throw format_error, the message starting with `what`.

// Writes the temporary file of `path` in full, through fill(stream), and returns its name. A file of
// that name is removed first, not truncated, so that a mapping of it (map_safetensors) keeps its bytes
// (a directory of that name is left alone, and opening it fails).
template <class Fill>
std::string write_partial(const std::string& path, const std::string& what, Fill&& fill) {
  const std::string partial = path + ".partial";
  std::error_code ec;
  if (!std::filesystem::is_directory(partial, ec)) std::filesystem::remove(partial, ec);
  std::ofstream out(partial, std::ios::binary | std::ios::trunc);
  if (!out) throw format_error(what + ": cannot open the file for writing (" + partial + ")");
  try {
    fill(out);
  } catch (...) {
    out.close();
    std::error_code ec;
    std::filesystem::remove(partial, ec);
    throw;
  }
  out.close();
  if (!out) {
    std::error_code ec;
    std::filesystem::remove(partial, ec);
    throw format_error(what + ": writing the file failed; " + path + " is as it was");
  }
  return partial;
}

// Renames the temporary file `partial` over `path`.
inline void commit_partial(const std::string& partial, const std::string& path, const std::string& what) {
  std::error_code ec;
  std::filesystem::rename(partial, path, ec);
  if (ec) {
    const std::string reason = ec.message();
    std::filesystem::remove(partial, ec);
    throw format_error(what + ": cannot replace the file (" + reason + "); " + path + " is as it was");
  }
}

// Throws format_error, its message starting with `what`, unless `path` names a regular file (a directory
// opens as a stream of unknown size).
inline void check_regular_file(const std::string& path, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    throw format_error(what + ": cannot open the file (" +
                       (std::filesystem::exists(path, ec) ? "not a regular file" : "no such file") + ")");
}

inline std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Round-to-odd double → float: the float nearest to x towards zero, with its last bit set when inexact.
// Rounding that float to a format of at most 22 significant bits (half: 11, bfloat16: 8) then gives the
// correctly rounded (nearest-even) result of x itself, with no double-rounding error.
inline float round_to_odd(double x) {
  float f = static_cast<float>(x);
  if (!std::isfinite(x) || static_cast<double>(f) == x) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof bits);
  return f;
}

template <class T>
float to_float_for_narrowing(T x) {
  return static_cast<float>(x);
}
template <>
inline float to_float_for_narrowing<double>(double x) {
  return round_to_odd(x);
}

// Decodes n elements of dtype `type` (little-endian bytes) into out.
template <class T>
void decode(dtype type, const unsigned char* p, std::size_t n, T* out) {
  for (std::size_t i = 0; i < n; ++i) {
    switch (type) {
      case dtype::F64: {
        const std::uint64_t bits = read_u64_le(p + 8 * i);
        double v;
        std::memcpy(&v, &bits, sizeof v);
        // Into half or bfloat16 through round_to_odd, as the writer narrows: once rounded, not twice.
        if constexpr (std::is_same<T, Eigen::half>::value || std::is_same<T, Eigen::bfloat16>::value)
          out[i] = T(round_to_odd(v));
        else
          out[i] = static_cast<T>(v);
        break;
      }
      case dtype::F32: {
        const std::uint32_t bits = std::uint32_t(p[4 * i]) | std::uint32_t(p[4 * i + 1]) << 8 |
                                   std::uint32_t(p[4 * i + 2]) << 16 | std::uint32_t(p[4 * i + 3]) << 24;
        float v;
        std::memcpy(&v, &bits, sizeof v);
        out[i] = static_cast<T>(v);
        break;
      }
      case dtype::F16: {
        const auto bits = static_cast<std::uint16_t>(p[2 * i] | p[2 * i + 1] << 8);
        out[i] = static_cast<T>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits)));
        break;
      }
      case dtype::BF16: {
        const auto bits = static_cast<std::uint16_t>(p[2 * i] | p[2 * i + 1] << 8);
        out[i] = static_cast<T>(static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits)));
        break;
      }
      default:
        return;  // callers check is_floating first
    }
  }
}

// Encodes n values as dtype `type` (F64, F32, F16 or BF16), little-endian, appending to out. Narrowing
// rounds once to nearest-even.
template <class T>
void encode(const T* x, std::size_t n, dtype type, std::vector<unsigned char>& out) {
  const std::size_t width = dtype_size(type);
  const std::size_t start = out.size();
  out.resize(start + n * width);
  unsigned char* p = out.data() + start;
  for (std::size_t i = 0; i < n; ++i, p += width) {
    std::uint64_t bits = 0;
    if (type == dtype::F64) {
      const double v = static_cast<double>(x[i]);
      std::memcpy(&bits, &v, 8);
    } else if (type == dtype::F32) {
      const float v = static_cast<float>(x[i]);
      std::uint32_t b;
      std::memcpy(&b, &v, 4);
      bits = b;
    } else if (type == dtype::F16) {
      bits = Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(to_float_for_narrowing(x[i])));
    } else {
      bits = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(to_float_for_narrowing(x[i])));
    }
    for (std::size_t b = 0; b < width; ++b) p[b] = static_cast<unsigned char>(bits >> (8 * b));
  }
}

}  // namespace detail

// The value x becomes when stored as `type` (F64, F32, F16 or BF16): rounded once to nearest-even, as
// safetensors_writer stores it. Other dtypes return x unchanged.
inline double stored_value(double x, dtype type) {
  switch (type) {
    case dtype::F32: return static_cast<double>(static_cast<float>(x));
    case dtype::F16: return static_cast<double>(static_cast<float>(Eigen::half(detail::round_to_odd(x))));
    case dtype::BF16: return static_cast<double>(static_cast<float>(Eigen::bfloat16(detail::round_to_odd(x))));
    default: return x;
  }
}

// A parsed, fully validated safetensors file: its bytes held in memory (parse, read_safetensors) or
// mapped from the file (map_safetensors). The bytes are never written; copies share them.
class safetensors_file {
 public:
  safetensors_file() = default;

  // Parses and validates `size` bytes (copied). `name` names the source in error messages. Throws
  // format_error.
  static safetensors_file parse(const void* bytes, std::size_t size, const std::string& name = "<memory>") {
    return parse(std::vector<unsigned char>(static_cast<const unsigned char*>(bytes),
                                            static_cast<const unsigned char*>(bytes) + size),
                 name);
  }
  static safetensors_file parse(std::vector<unsigned char> bytes, const std::string& name) {
    auto owner = std::make_shared<const std::vector<unsigned char>>(std::move(bytes));
    return parse(std::shared_ptr<const unsigned char>(owner, owner->data()), owner->size(), name);
  }
  // Parses and validates `size` bytes at `bytes`, which the file keeps (and its copies share) for as
  // long as any of them lives. Throws format_error.
  static safetensors_file parse(std::shared_ptr<const unsigned char> bytes, std::size_t size,
                                const std::string& name) {
    safetensors_file f;
    f.name_ = name;
    f.bytes_ = std::move(bytes);
    f.validate(size);
    return f;
  }

  // The file name given to parse / read_safetensors.
  const std::string& name() const { return name_; }

  // Every tensor, in data-area order.
  const std::vector<tensor_info>& tensors() const { return tensors_; }

  // The "__metadata__" map (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool contains(const std::string& tensor) const { return by_name_.count(tensor) != 0; }

  // The entry of `tensor`; throws format_error naming the file and the tensor if there is none.
  const tensor_info& info(const std::string& tensor) const {
    auto it = by_name_.find(tensor);
    if (it == by_name_.end()) detail::fail(name_, "has no tensor \"" + tensor + "\"");
    return tensors_[it->second];
  }

  // The raw little-endian bytes of `tensor` (info(tensor).end − begin of them).
  const unsigned char* raw(const std::string& tensor) const { return raw(info(tensor)); }
  const unsigned char* raw(const tensor_info& t) const { return bytes_.get() + data_start_ + t.begin; }

  // The values of `tensor` converted to T, row-major. Throws format_error if its dtype is not one of
  // F64, F32, F16, BF16.
  template <class T>
  std::vector<T> load_values(const std::string& tensor) const {
    const tensor_info& t = info(tensor);
    check_floating(t);
    std::vector<T> out(static_cast<std::size_t>(t.size()));
    detail::decode(t.type, raw(t), out.size(), out.data());
    return out;
  }

  // `tensor` as a rank-N tensor of T. Throws format_error if its rank is not N or its dtype is not one
  // of F64, F32, F16, BF16.
  template <class T, int N>
  tensor<T, N> load(const std::string& tensor) const {
    const tensor_info& t = info(tensor);
    if (static_cast<int>(t.shape.size()) != N)
      detail::fail(name_, "tensor \"" + tensor + "\" has shape " + detail::shape_text(t.shape) + " (rank " +
                              std::to_string(t.shape.size()) + ") but rank " + std::to_string(N) + " was asked for");
    check_floating(t);
    Eigen::DSizes<index, N> dims;
    for (int d = 0; d < N; ++d) dims[d] = t.shape[static_cast<std::size_t>(d)];
    tensor_adapters::tensor<T, N> out(dims);
    detail::decode(t.type, raw(t), static_cast<std::size_t>(t.size()), out.data());
    return out;
  }

 private:
  void check_floating(const tensor_info& t) const {
    if (!is_floating(t.type))
      detail::fail(name_, "tensor \"" + t.name + "\" has dtype " + dtype_name(t.type) +
                              ", which does not load as floating point (F64, F32, F16 or BF16)");
  }

  void validate(std::size_t size) {
    if (size < 8)
      detail::fail(name_, "the file has " + std::to_string(size) + " bytes, fewer than the 8 of the header length");
    const std::uint64_t n = detail::read_u64_le(bytes_.get());
    if (n > detail::max_header_size)
      detail::fail(name_, "the header length " + std::to_string(n) + " exceeds the limit of " +
                              std::to_string(detail::max_header_size) + " bytes");
    if (n > size - 8)
      detail::fail(name_, "the header length " + std::to_string(n) + " runs past the end of the file (" +
                              std::to_string(size) + " bytes)");
    if (n < 2 || bytes_.get()[8] != '{')
      detail::fail(name_, "the header does not start with '{'");
    data_start_ = 8 + static_cast<std::size_t>(n);
    const std::uint64_t data_size = size - data_start_;

    const nlohmann::ordered_json header = detail::parse_json_strict(
        reinterpret_cast<const char*>(bytes_.get() + 8), static_cast<std::size_t>(n), "safetensors " + name_ + " header");
    if (!header.is_object()) detail::fail(name_, "the header is not a JSON object");

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& key = it.key();
      const auto& value = it.value();
      if (key == "__metadata__") {
        if (value.is_null()) continue;  // an absent map, as the format's reference reader takes it
        if (!value.is_object()) detail::fail(name_, "__metadata__ is not a JSON object or null");
        for (auto m = value.begin(); m != value.end(); ++m) {
          if (!m.value().is_string())
            detail::fail(name_, "__metadata__ entry \"" + m.key() + "\" is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(key, value));
    }

    // The byte ranges must tile [0, data_size) exactly.
    std::vector<std::size_t> order(tensors_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return std::make_pair(tensors_[a].begin, tensors_[a].end) < std::make_pair(tensors_[b].begin, tensors_[b].end);
    });
    std::uint64_t expected = 0;
    const tensor_info* previous = nullptr;
    for (std::size_t i : order) {
      const tensor_info& t = tensors_[i];
      if (t.end > data_size)
        detail::fail(name_, "tensor \"" + t.name + "\" has data_offsets [" + std::to_string(t.begin) + ", " +
                                std::to_string(t.end) + "] beyond the data area of " + std::to_string(data_size) +
                                " bytes");
      if (t.begin < expected)
        detail::fail(name_, "tensor \"" + t.name + "\" (bytes [" + std::to_string(t.begin) + ", " +
                                std::to_string(t.end) + ")) overlaps tensor \"" + previous->name + "\" (bytes [" +
                                std::to_string(previous->begin) + ", " + std::to_string(previous->end) + "))");
      if (t.begin > expected)
        detail::fail(name_, "the data area has unused bytes [" + std::to_string(expected) + ", " +
                                std::to_string(t.begin) + ") before tensor \"" + t.name + "\"");
      expected = t.end;
      previous = &t;
    }
    if (expected != data_size)
      detail::fail(name_, "the data area has " + std::to_string(data_size) + " bytes but the tensors cover only " +
                              std::to_string(expected));

    std::vector<tensor_info> sorted;
    sorted.reserve(tensors_.size());
    for (std::size_t i : order) sorted.push_back(std::move(tensors_[i]));
    tensors_ = std::move(sorted);
    for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_[tensors_[i].name] = i;
  }

  tensor_info parse_entry(const std::string& key, const nlohmann::ordered_json& value) const {
    const std::string what = "tensor \"" + key + "\"";
    if (!value.is_object()) detail::fail(name_, what + " is not described by a JSON object");
    tensor_info t;
    t.name = key;
    auto dt = value.find("dtype");
    if (dt == value.end() || !dt->is_string()) detail::fail(name_, what + " has no \"dtype\" string");
    const std::string type = dt->get<std::string>();
    if (!parse_dtype(type, t.type)) detail::fail(name_, what + " has the unknown dtype \"" + type + "\"");

    auto sh = value.find("shape");
    if (sh == value.end() || !sh->is_array()) detail::fail(name_, what + " has no \"shape\" array");
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned())
        detail::fail(name_,
                     what + " has a shape entry that is not a non-negative integer: " + detail::json_excerpt(d));
      if (d.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<index>::max()))
        detail::fail(name_, what + " has a shape " + detail::json_excerpt(*sh) + " whose size overflows");
      t.shape.push_back(static_cast<index>(d.get<std::uint64_t>()));
    }
    std::uint64_t bytes = 0;
    if (detail::shape_overflows(t.shape, t.type, bytes))
      detail::fail(name_, what + " has a shape " + detail::json_excerpt(*sh) + " whose size overflows");

    auto off = value.find("data_offsets");
    if (off == value.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      detail::fail(name_, what + " has no \"data_offsets\" pair of non-negative integers");
    t.begin = (*off)[0].get<std::uint64_t>();
    t.end = (*off)[1].get<std::uint64_t>();
    if (t.end < t.begin)
      detail::fail(name_, what + " has data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                              "] that end before they begin");
    if (t.end - t.begin != bytes)
      detail::fail(name_, what + " has shape " + detail::json_excerpt(*sh) + " and dtype " + type + " (" +
                              std::to_string(bytes) + " bytes) but data_offsets [" + std::to_string(t.begin) + ", " +
                              std::to_string(t.end) + "] span " + std::to_string(t.end - t.begin) + " bytes");
    return t;
  }

  std::string name_;
  std::shared_ptr<const unsigned char> bytes_;
  std::size_t data_start_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

// Reads and validates the file at `path`. Throws format_error if it cannot be opened or read, or if it is
// not a valid safetensors file.
inline safetensors_file read_safetensors(const std::string& path) {
  detail::check_regular_file(path, "safetensors " + path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error("safetensors " + path + ": cannot open the file");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) throw format_error("safetensors " + path + ": cannot determine the file size");
  in.seekg(0, std::ios::beg);
  std::vector<unsigned char> bytes(static_cast<std::size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    throw format_error("safetensors " + path + ": cannot read the file");
  return safetensors_file::parse(std::move(bytes), path);
}

// Maps the file at `path` into memory read-only and validates it, as read_safetensors does, without
// reading the tensors' bytes: a tensor's pages are read from the file when it is loaded or its raw bytes
// are used, so a large checkpoint costs only the tensors taken from it (the pages are file-backed
// memory, which the system can drop and read again). The mapping lives as long as the returned file or
// a copy of it; removing the file or renaming another over it meanwhile does not affect it on a local
// file system (safetensors_writer::write(path) does the latter), but the file must not be truncated or
// rewritten in place (reading a page cut off by truncation ends the process with SIGBUS, as with any
// mapping). Where the file cannot be mapped (an empty file, a file system without mmap, a system
// without POSIX mmap) it is read, as read_safetensors does. Throws format_error as read_safetensors
// does.
inline safetensors_file map_safetensors(const std::string& path) {
#if defined(__unix__) || defined(__APPLE__)
  detail::check_regular_file(path, "safetensors " + path);
#ifdef O_CLOEXEC
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
#else
  const int fd = ::open(path.c_str(), O_RDONLY);
#endif
  if (fd < 0) return read_safetensors(path);  // which says why it cannot be opened
  struct ::stat st;
  void* address = MAP_FAILED;
  std::size_t size = 0;
  if (::fstat(fd, &st) == 0 && st.st_size > 0 &&
      static_cast<std::uintmax_t>(st.st_size) <= std::numeric_limits<std::size_t>::max()) {
    size = static_cast<std::size_t>(st.st_size);
    address = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  ::close(fd);  // a mapping keeps the file open
  if (address == MAP_FAILED) return read_safetensors(path);
  std::shared_ptr<const unsigned char> bytes(static_cast<const unsigned char*>(address),
                                             [size](const unsigned char* p) {
                                               ::munmap(const_cast<unsigned char*>(p), size);
                                             });
  return safetensors_file::parse(std::move(bytes), size, path);
#else
  return read_safetensors(path);
#endif
}

// Collects tensors, then writes them as one safetensors file. Tensors are laid out by decreasing element
// size, then by name, and the header is padded with spaces to a multiple of 8 bytes, so every tensor
// starts at an offset aligned to its element size. A tensor is added as data (copied into the writer) or
// deferred (produced when the file is written).
class safetensors_writer {
 public:
  // Adds `t` (any rank, row-major) as `name`, stored as `type` (default: t's own type; F64, F32, F16 or
  // BF16). Throws format_error if the name is "__metadata__", not valid UTF-8 or already added, or if
  // `type` is not a floating-point dtype.
  template <class T, int N>
  void add(const std::string& name, const_tensor_view<T, N> t, dtype type = dtype_of<T>()) {
    std::vector<index> shape(static_cast<std::size_t>(N));
    for (int d = 0; d < N; ++d) shape[static_cast<std::size_t>(d)] = t.dimension(d);
    add_values(name, t.data(), shape, type);
  }
  template <class T, int N>
  void add(const std::string& name, const tensor<T, N>& t, dtype type = dtype_of<T>()) {
    add<T, N>(name, view(t), type);
  }

  // Adds `count` = Π shape values from `data` as `name`, stored as `type`.
  template <class T>
  void add_values(const std::string& name, const T* data, const std::vector<index>& shape, dtype type = dtype_of<T>()) {
    check_floating(name, type);
    entry e = make_entry(name, type, shape);
    detail::encode(data, static_cast<std::size_t>(e.size / dtype_size(type)), type, e.bytes);
    add_entry(std::move(e));
  }

  // Adds raw little-endian bytes as `name` (any dtype of the format, e.g. copied from another file).
  // Throws format_error if size does not equal Π shape · dtype_size(type).
  void add_raw(const std::string& name, dtype type, const std::vector<index>& shape, const unsigned char* data,
               std::size_t size) {
    entry e = make_entry(name, type, shape);
    if (e.size != size)
      throw format_error("safetensors writer: tensor \"" + name + "\" of shape " + detail::shape_text(shape) +
                         " and dtype " + dtype_name(type) + " needs " + std::to_string(e.size) + " bytes, not " +
                         std::to_string(size));
    e.bytes.assign(data, data + size);
    add_entry(std::move(e));
  }

  // Adds `name`, stored as `type` (F64, F32, F16 or BF16), whose Π shape values values() returns (a
  // std::vector of a floating-point type) only when the file is written, each time it is: the writer
  // holds no copy of them, so a file of many large tensors is written holding one at a time. values is
  // copied into the writer and called as const (a lambda without `mutable`, its captures copyable). An
  // exception from values() ends the write with it (write(path) leaving the file as it was); so does
  // format_error if values() returns another number of values. Throws format_error as add_values does.
  template <class Values>
  void add_deferred(const std::string& name, const std::vector<index>& shape, dtype type, Values values) {
    static_assert(std::is_copy_constructible<Values>::value && std::is_invocable<const Values&>::value,
                  "add_deferred: values must be copyable and callable as const, with no arguments");
    check_floating(name, type);
    entry e = make_entry(name, type, shape);
    const std::uint64_t count = e.size / dtype_size(type);
    e.fill = [values = std::move(values), name, type, count](std::vector<unsigned char>& bytes) {
      const auto v = values();
      if (v.size() != count)
        throw format_error("safetensors writer: tensor \"" + name + "\" needs " + std::to_string(count) +
                           " values, but its deferred values gave " + std::to_string(v.size()));
      detail::encode(v.data(), v.size(), type, bytes);
    };
    add_entry(std::move(e));
  }

  // The same for raw little-endian bytes (any dtype of the format): bytes() returns a
  // std::vector<unsigned char> of Π shape · dtype_size(type) of them.
  template <class Bytes>
  void add_raw_deferred(const std::string& name, dtype type, const std::vector<index>& shape, Bytes bytes) {
    static_assert(std::is_copy_constructible<Bytes>::value && std::is_invocable<const Bytes&>::value,
                  "add_raw_deferred: bytes must be copyable and callable as const, with no arguments");
    entry e = make_entry(name, type, shape);
    e.fill = [bytes = std::move(bytes)](std::vector<unsigned char>& out) { out = bytes(); };
    add_entry(std::move(e));
  }

  // Sets a "__metadata__" entry. Throws format_error if the key or the value is not valid UTF-8.
  void set_metadata(const std::string& key, const std::string& value) {
    for (const std::string* s : {&key, &value})
      if (!detail::valid_utf8(reinterpret_cast<const unsigned char*>(s->data()), s->size()))
        throw format_error("safetensors writer: the __metadata__ entry \"" + key + "\" is not valid UTF-8");
    metadata_[key] = value;
  }

  // The whole file as bytes (producing every deferred tensor).
  std::vector<unsigned char> serialize() const {
    std::vector<unsigned char> out;
    emit(
        [&out](const unsigned char* data, std::size_t size) {
          out.insert(out.end(), data, data + size);
          return true;
        },
        [&out](std::size_t size) { out.reserve(size); });
    return out;
  }

  // Writes the whole file to `out` (a binary stream), tensor by tensor, producing the deferred tensors
  // as it reaches them (on every call): no copy of the file is formed in memory. A failed write sets the
  // stream's failbit, as its own writes do, and stops there, before the next deferred tensor is produced.
  // An exception from a deferred tensor leaves the stream with the part of the file before it.
  void write(std::ostream& out) const {
    emit(
        [&out](const unsigned char* data, std::size_t size) {
          return bool(out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size)));
        },
        [](std::size_t) {});
  }

  // Writes the file to `path`, through a temporary file renamed over it once complete, so that a failed
  // write leaves an existing file as it was (see detail::write_partial). Throws format_error if it cannot
  // be written.
  void write(const std::string& path) const {
    const std::string what = "safetensors " + path;
    detail::commit_partial(detail::write_partial(path, what, [this](std::ostream& out) { write(out); }), path, what);
  }

 private:
  struct entry {
    std::string name;
    dtype type;
    std::vector<index> shape;
    std::uint64_t size;                                      // in bytes
    std::vector<unsigned char> bytes;                        // the data, or
    std::function<void(std::vector<unsigned char>&)> fill;  // what produces it (deferred)
  };

  // The file's bytes in order, through put(data, size) (false: stop): the 8-byte header length, the
  // header, then the tensors' data; reserve(total size) first.
  template <class Put, class Reserve>
  void emit(Put&& put, Reserve&& reserve) const {
    std::vector<const entry*> order;
    for (const entry& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(), [](const entry* a, const entry* b) {
      const std::size_t sa = dtype_size(a->type), sb = dtype_size(b->type);
      return sa != sb ? sa > sb : a->name < b->name;
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& kv : metadata_) m[kv.first] = kv.second;
      header["__metadata__"] = m;
    }
    std::uint64_t offset = 0;
    for (const entry* e : order) {
      nlohmann::ordered_json info = nlohmann::ordered_json::object();
      info["dtype"] = dtype_name(e->type);
      info["shape"] = e->shape;
      info["data_offsets"] = {offset, offset + e->size};
      header[e->name] = info;
      offset += e->size;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    reserve(static_cast<std::size_t>(8 + text.size() + offset));
    unsigned char length[8];
    const auto header_size = static_cast<std::uint64_t>(text.size());
    for (int b = 0; b < 8; ++b) length[b] = static_cast<unsigned char>(header_size >> (8 * b));
    if (!put(length, sizeof length)) return;
    if (!put(reinterpret_cast<const unsigned char*>(text.data()), text.size())) return;
    std::vector<unsigned char> produced;
    for (const entry* e : order) {
      if (!e->fill) {
        if (!put(e->bytes.data(), e->bytes.size())) return;
        continue;
      }
      produced.clear();
      e->fill(produced);
      if (produced.size() != e->size)
        throw format_error("safetensors writer: tensor \"" + e->name + "\" of shape " + detail::shape_text(e->shape) +
                           " and dtype " + dtype_name(e->type) + " needs " + std::to_string(e->size) +
                           " bytes, but its deferred bytes were " + std::to_string(produced.size()));
      if (!put(produced.data(), produced.size())) return;
    }
  }

  static void check_floating(const std::string& name, dtype type) {
    if (!is_floating(type))
      throw format_error("safetensors writer: tensor \"" + name + "\" cannot be stored as " + dtype_name(type) +
                         " (F64, F32, F16 or BF16 only)");
  }

  // An entry without its data, once every check on it has passed (none of them records anything).
  entry make_entry(const std::string& name, dtype type, const std::vector<index>& shape) const {
    if (name == "__metadata__")
      throw format_error("safetensors writer: \"" + name + "\" is not a valid tensor name");
    if (!detail::valid_utf8(reinterpret_cast<const unsigned char*>(name.data()), name.size()))
      throw format_error("safetensors writer: the tensor name \"" + name + "\" is not valid UTF-8");
    for (index d : shape)
      if (d < 0) throw format_error("safetensors writer: tensor \"" + name + "\" has a negative extent");
    std::uint64_t bytes = 0;
    if (detail::shape_overflows(shape, type, bytes))
      throw format_error("safetensors writer: tensor \"" + name + "\" has a shape " + detail::shape_text(shape) +
                         " whose size overflows");
    if (names_.count(name) != 0)
      throw format_error("safetensors writer: tensor \"" + name + "\" was added twice");
    return entry{name, type, shape, bytes, {}, {}};
  }

  void add_entry(entry e) {
    names_.insert(e.name);
    entries_.push_back(std::move(e));
  }

  std::vector<entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace tensor_adapters::io
