// safetensors reading and writing: round trips for every floating dtype, the published byte layout,
// correct rounding on narrowing, metadata, and every kind of malformed file (each must raise
// io::format_error naming the file and the tensor, never read out of bounds — the sanitizer build checks
// that part).
#include <tensor_adapters/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <vector>

namespace ta = tensor_adapters;
namespace io = tensor_adapters::io;
using Catch::Matchers::Contains;

namespace {

using bytes = std::vector<unsigned char>;

// A file from a header text and a data area, with the header length field set to header.size() (or
// `length` when given).
bytes make_file(const std::string& header, const bytes& data, std::uint64_t length = ~std::uint64_t(0)) {
  if (length == ~std::uint64_t(0)) length = header.size();
  bytes out;
  for (int b = 0; b < 8; ++b) out.push_back(static_cast<unsigned char>(length >> (8 * b)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

bytes zeros(std::size_t n) { return bytes(n, 0); }

io::safetensors_file parse(const bytes& b, const std::string& name = "test.safetensors") {
  return io::safetensors_file::parse(b.data(), b.size(), name);
}

// Parsing must throw format_error whose message holds every fragment.
void require_rejected(const bytes& b, const std::vector<std::string>& fragments) {
  try {
    parse(b, "bad.safetensors");
    FAIL("the file was accepted");
  } catch (const io::format_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Contains("bad.safetensors"));
    for (const auto& f : fragments) CHECK_THAT(what, Contains(f));
  }
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

template <class T>
ta::tensor<T, 3> random_tensor(std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 3.0);
  ta::tensor<T, 3> t(2, 3, 5);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(normal(gen));
  return t;
}

}  // namespace

TEMPLATE_TEST_CASE("safetensors round trip of every floating dtype", "[safetensors]", float, double) {
  using T = TestType;
  const ta::tensor<T, 3> x = random_tensor<T>(1);
  io::safetensors_writer w;
  w.add("x.f64", x, io::dtype::F64);
  w.add("x.f32", x, io::dtype::F32);
  w.add("x.f16", x, io::dtype::F16);
  w.add("x.bf16", x, io::dtype::BF16);
  w.add("x.default", x);
  w.set_metadata("format", "pt");
  const bytes b = w.serialize();
  const io::safetensors_file f = parse(b);

  REQUIRE(f.tensors().size() == 5);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.info("x.default").type == io::dtype_of<T>());
  CHECK(f.info("x.f16").shape == std::vector<ta::index>{2, 3, 5});
  for (const char* name : {"x.f64", "x.default"}) {
    const auto y = f.load<T, 3>(name);
    for (ta::index i = 0; i < x.size(); ++i) REQUIRE(y.data()[i] == x.data()[i]);
  }
  const auto y32 = f.load<T, 3>("x.f32");
  for (ta::index i = 0; i < x.size(); ++i) REQUIRE(y32.data()[i] == static_cast<T>(static_cast<float>(x.data()[i])));
  // Narrowing rounds once to nearest-even; loading back is exact.
  const auto h = f.load<double, 3>("x.f16");
  const auto bf = f.load<double, 3>("x.bf16");
  for (ta::index i = 0; i < x.size(); ++i) {
    const double v = static_cast<double>(x.data()[i]);
    CHECK(h.data()[i] == static_cast<double>(static_cast<float>(Eigen::half(static_cast<float>(v)))));
    CHECK(bf.data()[i] == static_cast<double>(static_cast<float>(Eigen::bfloat16(static_cast<float>(v)))));
    CHECK(std::abs(h.data()[i] - v) <= std::ldexp(std::abs(v), -11));
    CHECK(std::abs(bf.data()[i] - v) <= std::ldexp(std::abs(v), -8));
  }
  // Any floating dtype loads as either float or double.
  const auto hf = f.load<float, 3>("x.f16");
  for (ta::index i = 0; i < x.size(); ++i) CHECK(static_cast<double>(hf.data()[i]) == h.data()[i]);
  const std::vector<T> flat = f.load_values<T>("x.f32");
  REQUIRE(flat.size() == 30);
  CHECK(flat[7] == static_cast<T>(static_cast<float>(x.data()[7])));
}

TEST_CASE("safetensors round trip of Eigen::half and Eigen::bfloat16 tensors", "[safetensors]") {
  ta::tensor<Eigen::half, 2> h(2, 2);
  ta::tensor<Eigen::bfloat16, 1> b(3);
  h.setConstant(Eigen::half(-1.5f));
  h(1, 1) = Eigen::half(65504.0f);
  b.setConstant(Eigen::bfloat16(0.15625f));
  io::safetensors_writer w;
  w.add("h", h);
  w.add("b", b);
  const io::safetensors_file f = parse(w.serialize());
  CHECK(f.info("h").type == io::dtype::F16);
  CHECK(f.info("b").type == io::dtype::BF16);
  CHECK(f.load<float, 2>("h")(1, 1) == 65504.0f);
  CHECK(f.load<double, 2>("h")(0, 1) == -1.5);
  CHECK(f.load<float, 1>("b")(2) == 0.15625f);
}

TEST_CASE("safetensors narrowing from double rounds once (no double rounding through float)", "[safetensors]") {
  // 1 + 2^-11 + 2^-40 lies just above the midpoint between the halves 1 and 1 + 2^-10: the correctly
  // rounded half is 1 + 2^-10, while rounding to float first lands on the midpoint and then on 1.
  const double h_case = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  const double bf_case = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  REQUIRE(static_cast<float>(Eigen::half(static_cast<float>(h_case))) == 1.0f);
  ta::tensor<double, 1> x(4);
  x(0) = h_case;
  x(1) = -h_case;
  x(2) = bf_case;
  x(3) = 1.0 + std::ldexp(1.0, -11);  // an exact midpoint: ties to even, 1
  io::safetensors_writer w;
  w.add("h", x, io::dtype::F16);
  w.add("b", x, io::dtype::BF16);
  const io::safetensors_file f = parse(w.serialize());
  const auto h = f.load<double, 1>("h");
  const auto b = f.load<double, 1>("b");
  CHECK(h(0) == 1.0 + std::ldexp(1.0, -10));
  CHECK(h(1) == -(1.0 + std::ldexp(1.0, -10)));
  CHECK(h(3) == 1.0);
  CHECK(b(2) == 1.0 + std::ldexp(1.0, -7));
  CHECK(b(0) == 1.0);
  // So does loading an F64 tensor into Eigen::half or Eigen::bfloat16.
  io::safetensors_writer w64;
  w64.add("x", x, io::dtype::F64);
  const io::safetensors_file f64 = parse(w64.serialize());
  const auto hx = f64.load<Eigen::half, 1>("x");
  const auto bx = f64.load<Eigen::bfloat16, 1>("x");
  CHECK(static_cast<float>(hx(0)) == 1.0f + std::ldexp(1.0f, -10));
  CHECK(static_cast<float>(hx(1)) == -(1.0f + std::ldexp(1.0f, -10)));
  CHECK(static_cast<float>(hx(3)) == 1.0f);
  CHECK(static_cast<float>(bx(2)) == 1.0f + std::ldexp(1.0f, -7));
  CHECK(static_cast<float>(bx(0)) == 1.0f);
  // Just below the midpoints, where rounding to float first goes up onto the midpoint (and then to the
  // even neighbour above): the correctly rounded value is 1.
  ta::tensor<double, 1> under(2);
  under(0) = 1.0 + std::ldexp(1.0, -11) - std::ldexp(1.0, -40);
  under(1) = 1.0 + std::ldexp(1.0, -8) - std::ldexp(1.0, -40);
  REQUIRE(static_cast<float>(under(0)) == 1.0f + std::ldexp(1.0f, -11));  // float rounds up to the midpoint
  io::safetensors_writer wu;
  wu.add("h", under, io::dtype::F16);
  wu.add("b", under, io::dtype::BF16);
  wu.add("x", under, io::dtype::F64);
  const io::safetensors_file fu = parse(wu.serialize());
  CHECK(fu.load<double, 1>("h")(0) == 1.0);
  CHECK(fu.load<double, 1>("b")(1) == 1.0);
  CHECK(static_cast<float>(fu.load<Eigen::half, 1>("x")(0)) == 1.0f);
  CHECK(static_cast<float>(fu.load<Eigen::bfloat16, 1>("x")(1)) == 1.0f);
  // Overflow and non-finite values.
  ta::tensor<double, 1> big(3);
  big(0) = 1e6;
  big(1) = -std::numeric_limits<double>::infinity();
  big(2) = std::numeric_limits<double>::quiet_NaN();
  io::safetensors_writer w2;
  w2.add("big", big, io::dtype::F16);
  const auto g = parse(w2.serialize()).load<double, 1>("big");
  CHECK(g(0) == std::numeric_limits<double>::infinity());
  CHECK(g(1) == -std::numeric_limits<double>::infinity());
  CHECK(std::isnan(g(2)));
}

TEST_CASE("safetensors writer follows the published layout", "[safetensors]") {
  ta::tensor<float, 2> a(1, 2);
  a(0, 0) = 1.0f;
  a(0, 1) = -2.0f;
  ta::tensor<double, 1> d(1);
  d(0) = 0.5;
  io::safetensors_writer w;
  w.add("a", a);
  w.add("d", d);
  const bytes b = w.serialize();
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[static_cast<std::size_t>(i)];
  CHECK(n % 8 == 0);
  REQUIRE(b.size() == 8 + n + 8 + 8);
  const std::string header(b.begin() + 8, b.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  CHECK(header.front() == '{');
  // F64 first (larger elements first), offsets relative to the data area.
  CHECK_THAT(header, Contains("\"d\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}"));
  CHECK_THAT(header, Contains("\"a\":{\"dtype\":\"F32\",\"shape\":[1,2],\"data_offsets\":[8,16]}"));
  const std::size_t data = 8 + n;
  // 0.5 as little-endian IEEE binary64, then 1.0f and -2.0f as binary32.
  const bytes expected = {0, 0, 0, 0, 0, 0, 0xE0, 0x3F, 0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0};
  CHECK(bytes(b.begin() + static_cast<std::ptrdiff_t>(data), b.end()) == expected);
}

TEST_CASE("safetensors hand-written files: layout variants that are valid", "[safetensors]") {
  SECTION("padding, metadata, an empty tensor and a scalar") {
    const std::string h = "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"\xC3\xA9t\xC3\xA9\"}," +
                          entry("e", "F32", "[0,3]", 0, 0) + "," + entry("s", "F64", "[]", 0, 8) + "," +
                          entry("v", "F32", "[2]", 8, 16) + "}      ";
    bytes data = zeros(16);
    data[14] = 0x80;
    data[15] = 0x3F;  // v[1] = 1.0f
    const auto f = parse(make_file(h, data));
    CHECK(f.metadata().at("note") == "\xC3\xA9t\xC3\xA9");
    CHECK(f.load<float, 2>("e").size() == 0);
    CHECK(f.load<double, 0>("s")() == 0.0);
    CHECK(f.load<float, 1>("v")(1) == 1.0f);
    CHECK(f.tensors().front().name == "e");
  }
  SECTION("a null __metadata__ is no metadata") {
    const auto f = parse(make_file("{\"__metadata__\":null," + entry("v", "F32", "[1]", 0, 4) + "}", zeros(4)));
    CHECK(f.metadata().empty());
    CHECK(f.tensors().size() == 1);
  }
  SECTION("no tensors at all") {
    const auto f = parse(make_file("{}", {}));
    CHECK(f.tensors().empty());
  }
  SECTION("integer dtypes are valid and copy raw, but do not load as floating point") {
    // Every dtype's element size: two elements of each, back to back.
    const std::pair<const char*, int> sizes[] = {{"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
                                                 {"I16", 2},  {"U16", 2}, {"I32", 4}, {"U32", 4},     {"U64", 8}};
    std::string header = "{";
    std::size_t offset = 0;
    for (const auto& [type, size] : sizes) {
      header += (offset ? "," : "") + entry(std::string("t") + type, type, "[2]", offset, offset + 2 * size);
      offset += 2 * std::size_t(size);
    }
    const auto all = parse(make_file(header + "}", zeros(offset)));
    for (const auto& [type, size] : sizes) {
      INFO(type);
      CHECK(io::dtype_size(all.info(std::string("t") + type).type) == std::size_t(size));
    }
    const auto f = parse(make_file("{" + entry("ids", "I64", "[2]", 0, 16) + "}", zeros(16)));
    CHECK(f.info("ids").type == io::dtype::I64);
    CHECK(f.raw("ids") != nullptr);
    REQUIRE_THROWS_WITH((f.load<float, 1>("ids")), Contains("ids") && Contains("I64"));
    io::safetensors_writer w;
    w.add_raw("ids", io::dtype::I64, {2}, f.raw("ids"), 16);
    CHECK(parse(w.serialize()).info("ids").shape == std::vector<ta::index>{2});
    REQUIRE_THROWS_WITH(w.add_raw("short", io::dtype::I64, {2}, f.raw("ids"), 8), Contains("needs 16 bytes, not 8"));
    // A refused tensor leaves its name free; a shape whose size overflows is refused before any arithmetic
    // on it (the sanitizer build would report a signed overflow).
    w.add_raw("short", io::dtype::I64, {1}, f.raw("ids"), 8);
    CHECK(parse(w.serialize()).info("short").shape == std::vector<ta::index>{1});
    const ta::index half = ta::index(1) << 62;
    REQUIRE_THROWS_WITH(w.add_raw("huge", io::dtype::I64, {half, 4}, f.raw("ids"), 16), Contains("overflows"));
    REQUIRE_THROWS_WITH(w.add_values("huge", f.raw("ids"), {half, 4}, io::dtype::F32), Contains("overflows"));
  }
}

TEST_CASE("safetensors rejects malformed files with a clear message", "[safetensors]") {
  const std::string good_header = "{" + entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "F32", "[2]", 16, 24) + "}";
  REQUIRE_NOTHROW(parse(make_file(good_header, zeros(24))));

  SECTION("truncated anywhere") {
    ta::tensor<float, 2> t(3, 4);
    t.setConstant(1.0f);
    io::safetensors_writer w;
    w.add("t", t);
    w.set_metadata("format", "pt");
    const bytes full = w.serialize();
    REQUIRE_NOTHROW(parse(full));
    for (std::size_t n = 0; n < full.size(); ++n)
      REQUIRE_THROWS_AS(parse(bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n))), io::format_error);
    require_rejected(bytes(full.begin(), full.begin() + 5), {"fewer than the 8"});
    require_rejected(bytes(full.begin(), full.end() - 4), {"\"t\"", "beyond the data area"});
  }
  SECTION("header length beyond the file") {
    require_rejected(make_file(good_header, zeros(24), good_header.size() + 25), {"runs past the end of the file"});
    require_rejected(make_file(good_header, zeros(24), std::uint64_t(1) << 63), {"exceeds the limit"});
    require_rejected(make_file(good_header, zeros(24), ~std::uint64_t(0) - 1), {"exceeds the limit"});
  }
  SECTION("offsets out of range, overlapping, leaving gaps or reversed") {
    require_rejected(make_file("{" + entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "F32", "[2]", 16, 24) + "}",
                               zeros(20)),
                     {"\"b\"", "beyond the data area"});
    require_rejected(make_file("{" + entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "F32", "[2]", 12, 20) + "}",
                               zeros(24)),
                     {"\"b\"", "overlaps", "\"w\""});
    require_rejected(make_file("{" + entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "F32", "[2]", 0, 8) + "}",
                               zeros(16)),
                     {"overlaps"});
    require_rejected(make_file("{" + entry("w", "F32", "[2,2]", 0, 16) + "," + entry("b", "F32", "[2]", 20, 28) + "}",
                               zeros(28)),
                     {"unused bytes", "\"b\""});
    require_rejected(make_file(good_header, zeros(32)), {"cover only 24"});
    require_rejected(make_file("{" + entry("w", "F32", "[0]", 8, 0) + "}", zeros(8)), {"\"w\"", "end before"});
    require_rejected(make_file("{" + entry("w", "F32", "[2]", 18446744073709551608ull, 18446744073709551615ull) + "}",
                               zeros(8)),
                     {"\"w\""});
  }
  SECTION("shape x dtype size differs from the byte span") {
    require_rejected(make_file("{" + entry("w", "F32", "[2,3]", 0, 16) + "}", zeros(16)),
                     {"\"w\"", "24 bytes", "span 16 bytes"});
    require_rejected(make_file("{" + entry("w", "F16", "[2,2]", 0, 16) + "}", zeros(16)), {"\"w\"", "8 bytes"});
    require_rejected(make_file("{" + entry("w", "F64", "[4294967296,4294967296]", 0, 16) + "}", zeros(16)),
                     {"\"w\"", "overflows"});
    // An empty tensor whose other extents multiply beyond the index type (a fan-in taken without the
    // zero would overflow), and the same with the zero first.
    require_rejected(make_file("{" + entry("w", "F32", "[4611686018427387904,3,0]", 0, 0) + "}", zeros(0)),
                     {"\"w\"", "overflows"});
    require_rejected(make_file("{" + entry("w", "F32", "[0,4611686018427387904,3]", 0, 0) + "}", zeros(0)),
                     {"\"w\"", "overflows"});
    require_rejected(make_file("{" + entry("w", "F32", "[-2,2]", 0, 16) + "}", zeros(16)), {"\"w\"", "shape entry"});
    require_rejected(make_file("{" + entry("w", "F32", "[2.0,2]", 0, 16) + "}", zeros(16)), {"\"w\"", "shape entry"});
  }
  SECTION("unknown dtype") {
    require_rejected(make_file("{" + entry("w", "F128", "[2]", 0, 32) + "}", zeros(32)), {"\"w\"", "unknown dtype \"F128\""});
    require_rejected(make_file("{" + entry("w", "float32", "[2]", 0, 8) + "}", zeros(8)), {"\"w\"", "float32"});
  }
  SECTION("duplicate keys") {
    require_rejected(make_file("{" + entry("w", "F32", "[1]", 0, 4) + "," + entry("w", "F32", "[1]", 4, 8) + "}", zeros(8)),
                     {"\"w\" appears twice"});
    require_rejected(
        make_file("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros(4)),
        {"\"dtype\" appears twice"});
    require_rejected(make_file("{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}", {}), {"\"a\" appears twice"});
  }
  SECTION("non-UTF-8 or invalid JSON") {
    require_rejected(make_file("{\"w\xFF\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros(4)),
                     {"not valid UTF-8"});
    require_rejected(make_file("{\"w\xC0\xAF\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", zeros(4)),
                     {"not valid UTF-8"});  // overlong '/'
    require_rejected(make_file("{\"w\xED\xA0\x80\":1}", {}), {"not valid UTF-8"});  // a surrogate
    require_rejected(make_file("{\"w\":\"\\ud800\"}", {}), {"invalid JSON"});      // an escaped lone surrogate
    require_rejected(make_file("{" + entry("w", "F32", "[1]", 0, 4) + ",}", zeros(4)), {"invalid JSON"});
    require_rejected(make_file("{" + entry("w", "F32", "[1]", 0, 4), zeros(4)), {"invalid JSON"});
    require_rejected(make_file("{} {}", {}), {"invalid JSON"});
    // The JSON parser stops at a NUL byte; what follows it must not be ignored.
    require_rejected(make_file(std::string("{" + entry("w", "F32", "[1]", 0, 4) + "}") + '\0' + "garbage", zeros(4)),
                     {"NUL byte"});
    require_rejected(make_file("[1,2]", {}), {"does not start with '{'"});
    require_rejected(make_file(" {}", {}), {"does not start with '{'"});
    require_rejected(make_file("", {}), {"does not start with '{'"});
  }
  SECTION("malformed entries and metadata") {
    require_rejected(make_file("{\"w\":[1,2]}", {}), {"\"w\"", "JSON object"});
    require_rejected(make_file("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", zeros(4)), {"\"w\"", "dtype"});
    require_rejected(make_file("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", zeros(4)), {"\"w\"", "shape"});
    require_rejected(make_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", zeros(4)),
                     {"\"w\"", "data_offsets"});
    require_rejected(make_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,-4]}}", zeros(4)),
                     {"\"w\"", "data_offsets"});
    require_rejected(make_file("{\"__metadata__\":{\"n\":3}}", {}), {"__metadata__", "\"n\""});
    require_rejected(make_file("{\"__metadata__\":[]}", {}), {"__metadata__"});
  }
}

TEST_CASE("safetensors lookups and writer errors", "[safetensors]") {
  ta::tensor<float, 2> t(2, 3);
  t.setConstant(2.0f);
  io::safetensors_writer w;
  w.add("t", t);
  REQUIRE_THROWS_WITH(w.add("t", t), Contains("\"t\"") && Contains("twice"));
  REQUIRE_THROWS_AS(w.add("__metadata__", t), io::format_error);
  REQUIRE_THROWS_AS(w.add("bad\xFF", t), io::format_error);
  REQUIRE_THROWS_AS(w.add("i", t, io::dtype::I32), io::format_error);
  REQUIRE_THROWS_AS(w.set_metadata("k", "\xFF"), io::format_error);
  // A shape whose element count overflows (here 16 · (2^62 + 8) · 4 wraps to 512) is refused, as the reader
  // would refuse the header.
  REQUIRE_THROWS_WITH(w.add_values("huge", t.data(), {16, (ta::index(1) << 62) + 8, 4}),
                      Contains("\"huge\"") && Contains("overflows"));
  const auto f = parse(w.serialize(), "lookups.safetensors");
  REQUIRE_THROWS_WITH((f.load<float, 2>("missing")), Contains("lookups.safetensors") && Contains("\"missing\""));
  REQUIRE_THROWS_WITH((f.load<float, 3>("t")), Contains("\"t\"") && Contains("rank 3"));
  CHECK_FALSE(f.contains("missing"));
  // format_error is an argument_error and an invalid_argument.
  REQUIRE_THROWS_AS(f.info("missing"), ta::argument_error);
  REQUIRE_THROWS_AS(f.info("missing"), std::invalid_argument);
}

TEST_CASE("a writer streams to a file or a stream the bytes it serializes", "[safetensors]") {
  ta::tensor<double, 2> t(3, 4);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = 0.1 * double(i) - 0.5;
  io::safetensors_writer w;
  w.add("b.half", t, io::dtype::F16);
  w.add("a.double", t);
  w.add("c.float", t, io::dtype::F32);
  w.add_raw("ids", io::dtype::U8, {3}, bytes{1, 2, 3}.data(), 3);
  w.set_metadata("format", "pt");
  const bytes expected = w.serialize();
  REQUIRE(parse(expected).tensors().size() == 4);

  std::ostringstream stream;
  w.write(stream);
  CHECK(stream.good());
  const std::string text = stream.str();
  CHECK(bytes(text.begin(), text.end()) == expected);

  const std::string path = "test_safetensors_streamed.safetensors";
  w.write(path);
  std::ifstream in(path, std::ios::binary);
  CHECK(bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()) == expected);
  in.close();
  std::remove(path.c_str());

  // A stream that takes only the first 100 bytes: the write stops with the stream failed, before it
  // produces the deferred tensor after the failure.
  int produced = 0;
  w.add_deferred("z.last", {2}, io::dtype::F32, [&produced] {
    ++produced;
    return std::vector<float>{1.0f, 2.0f};
  });
  struct short_buffer : std::streambuf {
    std::size_t room = 100;
    int_type overflow(int_type c) override {
      if (room == 0 || traits_type::eq_int_type(c, traits_type::eof())) return traits_type::eof();
      --room;
      return c;
    }
  } buffer;
  std::ostream short_stream(&buffer);
  w.write(short_stream);
  CHECK(short_stream.fail());
  CHECK(buffer.room == 0);
  CHECK(produced == 0);
}

TEST_CASE("deferred tensors are produced when the file is written, as their values would be written", "[safetensors]") {
  ta::tensor<double, 2> t(3, 4);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = 0.1 * double(i) - 0.5;
  const bytes ids{7, 8, 9};
  io::safetensors_writer direct, deferred;
  direct.add("w", t, io::dtype::BF16);
  direct.add_raw("ids", io::dtype::U8, {3}, ids.data(), ids.size());
  direct.set_metadata("format", "pt");
  int calls = 0;
  deferred.add_deferred("w", {3, 4}, io::dtype::BF16, [&] {
    ++calls;
    return std::vector<double>(t.data(), t.data() + t.size());
  });
  deferred.add_raw_deferred("ids", io::dtype::U8, {3}, [&] { return ids; });
  deferred.set_metadata("format", "pt");
  CHECK(calls == 0);
  CHECK(deferred.serialize() == direct.serialize());
  CHECK(calls == 1);
  const std::string path = "test_safetensors_deferred.safetensors";
  deferred.write(path);
  CHECK(calls == 2);
  auto file_bytes = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  CHECK(file_bytes(path) == direct.serialize());

  // A producer that throws ends the write with its exception; one that gives the wrong number of values
  // with format_error naming the tensor. Either way the file is as it was and nothing partial is left.
  const bytes before = file_bytes(path);
  struct refused : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  io::safetensors_writer failing;
  failing.add_values("a", t.data(), {12}, io::dtype::F32);
  failing.add_deferred("b", {3, 4}, io::dtype::F32, []() -> std::vector<float> { throw refused("no values"); });
  REQUIRE_THROWS_AS(failing.write(path), refused);
  CHECK(file_bytes(path) == before);
  CHECK_FALSE(std::filesystem::exists(path + ".partial"));
  io::safetensors_writer short_values;
  short_values.add_deferred("b", {3, 4}, io::dtype::F16, [] { return std::vector<float>(11, 1.0f); });
  REQUIRE_THROWS_WITH(short_values.write(path),
                      Contains("\"b\"") && Contains("needs 12 values") && Contains("gave 11"));
  CHECK(file_bytes(path) == before);
  CHECK_FALSE(std::filesystem::exists(path + ".partial"));
  io::safetensors_writer long_raw;
  long_raw.add_raw_deferred("ids", io::dtype::U8, {3}, [] { return bytes(4, 0); });
  REQUIRE_THROWS_WITH(long_raw.serialize(), Contains("\"ids\"") && Contains("needs 3 bytes") && Contains("were 4"));
  std::remove(path.c_str());

  // Through a stream: an exception leaves the part of the file before the tensor that threw.
  std::ostringstream stream;
  REQUIRE_THROWS_AS(failing.write(stream), refused);
  const std::string part = stream.str();
  REQUIRE(part.size() > 8 + 48);
  const std::size_t header =
      static_cast<unsigned char>(part[0]) | std::size_t(static_cast<unsigned char>(part[1])) << 8;
  CHECK(part.size() == 8 + header + 48);  // the length field, the header, then "a"

  // The checks of add_values and add_raw apply when a deferred tensor is added.
  io::safetensors_writer checks;
  REQUIRE_THROWS_WITH(checks.add_deferred("i", {2}, io::dtype::I32, [] { return std::vector<double>(2); }),
                      Contains("cannot be stored as I32"));
  checks.add_raw_deferred("x", io::dtype::U8, {1}, [] { return bytes(1); });
  REQUIRE_THROWS_WITH(checks.add_deferred("x", {1}, io::dtype::F32, [] { return std::vector<double>(1); }),
                      Contains("added twice"));
  REQUIRE_THROWS_WITH(checks.add_raw_deferred("n", io::dtype::U8, {-1}, [] { return bytes(); }),
                      Contains("negative extent"));
}

TEST_CASE("safetensors files on disk", "[safetensors]") {
  const std::string path = "test_safetensors_roundtrip.safetensors";
  ta::tensor<double, 2> t(3, 2);
  t.setConstant(0.25);
  io::safetensors_writer w;
  w.add("t", t, io::dtype::F32);
  w.write(path);
  const auto f = io::read_safetensors(path);
  CHECK(f.name() == path);
  CHECK(f.load<double, 2>("t")(2, 1) == 0.25);
  std::remove(path.c_str());
  REQUIRE_THROWS_WITH(io::read_safetensors(path), Contains(path) && Contains("cannot open"));
  // A directory (say, a model folder passed for its file) is refused, not read as a stream of unknown size.
  const std::string dir = "test_safetensors_a_directory";
  std::filesystem::create_directories(dir);
  REQUIRE_THROWS_WITH(io::read_safetensors(dir), Contains(dir) && Contains("not a regular file"));
  std::filesystem::remove_all(dir);
  REQUIRE_THROWS_AS(w.write("no/such/directory/x.safetensors"), io::format_error);

  // A write that fails leaves the file it would have replaced as it was, and nothing partial behind:
  // here the temporary file cannot be created, or the target is a directory the rename cannot replace.
  auto file_bytes = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  w.write(path);
  const bytes before = file_bytes(path);
  std::filesystem::create_directories(path + ".partial");
  ta::tensor<float, 2> other(5, 5);
  other.setZero();
  io::safetensors_writer w2;
  w2.add("other", other);
  REQUIRE_THROWS_WITH(w2.write(path), Contains(path) && Contains("cannot open"));
  CHECK(file_bytes(path) == before);
  std::filesystem::remove_all(path + ".partial");
  const std::string target_dir = "test_safetensors_target_directory";
  std::filesystem::create_directories(target_dir);
  REQUIRE_THROWS_WITH(w2.write(target_dir), Contains(target_dir) && Contains("as it was"));
  CHECK_FALSE(std::filesystem::exists(target_dir + ".partial"));
  CHECK(std::filesystem::is_directory(target_dir));
  std::filesystem::remove_all(target_dir);
  std::remove(path.c_str());
}

namespace {

// The lines of /proc/self/maps that name `path` (Linux; 0 elsewhere).
int mappings_of(const std::string& path) {
  std::ifstream maps("/proc/self/maps");
  const std::string absolute = std::filesystem::absolute(path).string();
  int n = 0;
  for (std::string line; std::getline(maps, line);)
    if (line.size() >= absolute.size() &&
        line.compare(line.size() - absolute.size(), absolute.size(), absolute) == 0)
      ++n;
  return n;
}

// The number of open file descriptors (Linux; 0 elsewhere).
std::ptrdiff_t open_descriptors() {
  std::error_code ec;
  if (!std::filesystem::exists("/proc/self/fd", ec)) return 0;
  return std::distance(std::filesystem::directory_iterator("/proc/self/fd"), std::filesystem::directory_iterator());
}

bytes file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

TEST_CASE("a mapped safetensors file reads as the same file read into memory", "[safetensors]") {
  const std::string path = "test_safetensors_mapped.safetensors";
  std::mt19937 gen(31);
  std::normal_distribution<double> normal;
  ta::tensor<double, 3> t(4, 3, 5);
  for (ta::index i = 0; i < t.size(); ++i) t.data()[i] = normal(gen);
  ta::tensor<float, 2> s(20000, 3);  // 240 KB: many pages, the last one read last
  for (ta::index i = 0; i < s.size(); ++i) s.data()[i] = static_cast<float>(normal(gen));
  io::safetensors_writer w;
  w.add("t", t);
  w.add("t_bf16", t, io::dtype::BF16);
  w.add("s", s);
  const bytes flags{1, 0, 1};
  w.add_raw("flags", io::dtype::U8, {3}, flags.data(), flags.size());
  w.set_metadata("format", "pt");
  w.write(path);
  const bool linux_proc = std::filesystem::exists("/proc/self/maps");
  const std::ptrdiff_t descriptors = open_descriptors();

  const io::safetensors_file read = io::read_safetensors(path);
  io::safetensors_file mapped = io::map_safetensors(path);
  if (linux_proc) CHECK(mappings_of(path) == 1);  // mapped, not read
  CHECK(mapped.name() == path);
  CHECK(mapped.metadata() == read.metadata());
  REQUIRE(mapped.tensors().size() == read.tensors().size());
  for (std::size_t i = 0; i < read.tensors().size(); ++i) {
    const io::tensor_info& a = read.tensors()[i];
    const io::tensor_info& b = mapped.tensors()[i];
    CHECK(a.name == b.name);
    CHECK(a.begin == b.begin);
    CHECK(a.end == b.end);
    CHECK(std::memcmp(read.raw(a), mapped.raw(b), static_cast<std::size_t>(a.end - a.begin)) == 0);
  }
  const ta::tensor<double, 3> back = mapped.load<double, 3>("t");
  for (ta::index i = 0; i < t.size(); ++i) CHECK(back.data()[i] == t.data()[i]);
  CHECK(mapped.load<float, 2>("s")(19999, 2) == s(19999, 2));

  // A file written over the mapped one's path (renamed over it) leaves the mapping's bytes as they
  // were, as does a base named as the writer's temporary file (removed, not truncated).
  const bytes before = file_bytes(path);
  io::safetensors_writer other;
  other.add("t", t, io::dtype::F16);
  other.write(path);
  const auto s_bytes = static_cast<std::size_t>(read.info("s").end - read.info("s").begin);
  CHECK(std::memcmp(mapped.raw("s"), read.raw("s"), s_bytes) == 0);
  CHECK(io::read_safetensors(path).tensors().size() == 1);
  w.write(path + ".original");
  std::filesystem::rename(path + ".original", path + ".partial");
  io::safetensors_file partial = io::map_safetensors(path + ".partial");
  other.write(path);  // through path + ".partial", the mapped file's name
  CHECK(partial.load<float, 2>("s")(19999, 2) == s(19999, 2));
  partial = io::safetensors_file();
  CHECK(file_bytes(path) != before);

  // The mapping outlives the file's name and the object it came from: a copy keeps it, and the last
  // one unmaps it.
  std::remove(path.c_str());
  io::safetensors_file copy = mapped;
  mapped = io::safetensors_file();
  CHECK(copy.load<float, 2>("s")(0, 0) == s(0, 0));
  copy = io::safetensors_file();
  if (linux_proc) CHECK(mappings_of(path) == 0);

  // The errors are read_safetensors's, for the same files, and no call leaves a descriptor open.
  const std::string dir = "test_safetensors_mapped_directory";
  std::filesystem::create_directories(dir);
  auto write_bytes = [&](const bytes& b) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  };
  auto message = [](auto&& reader, const std::string& p) {
    try {
      reader(p);
    } catch (const io::format_error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  const auto by_reading = [](const std::string& p) { return io::read_safetensors(p); };
  const auto by_mapping = [](const std::string& p) { return io::map_safetensors(p); };
  CHECK_THAT(message(by_mapping, path), Contains(path) && Contains("cannot open"));
  CHECK(message(by_mapping, dir) == message(by_reading, dir));
  CHECK_THAT(message(by_mapping, dir), Contains("not a regular file"));
  write_bytes(bytes());  // an empty file, which mmap cannot map: read instead
  CHECK_THAT(message(by_mapping, path), Contains(path) && Contains("fewer than the 8"));
  write_bytes(make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", zeros(4)));
  CHECK_THAT(message(by_mapping, path), Contains("beyond the data area"));
  CHECK(message(by_mapping, path) == message(by_reading, path));
  std::filesystem::remove_all(dir);
  std::remove(path.c_str());
  if (linux_proc) CHECK(open_descriptors() == descriptors);
}

TEST_CASE("safetensors names and metadata ending in a multi-byte character round trip", "[safetensors]") {
  // A name or value whose last character takes 2, 3 or 4 bytes is valid UTF-8 to its very end (the
  // validator must not ask for a byte past the end of the text).
  ta::tensor<float, 1> t(2);
  t(0) = 1.5f;
  t(1) = -2.0f;
  const std::vector<std::string> names = {"w\xC3\xA9", "w\xE2\x82\xAC", "w\xF0\x9F\x98\x80"};  // wé, w€, w😀
  io::safetensors_writer w;
  for (const std::string& name : names) CHECK_NOTHROW(w.add(name, t));
  CHECK_NOTHROW(w.set_metadata("note", "caf\xC3\xA9"));
  CHECK_NOTHROW(w.set_metadata("cl\xC3\xA9", "\xE2\x82\xAC"));
  const io::safetensors_file f = parse(w.serialize());
  auto metadata = [&f](const std::string& key) {
    const auto it = f.metadata().find(key);
    return it == f.metadata().end() ? std::string("<absent>") : it->second;
  };
  CHECK(metadata("note") == "caf\xC3\xA9");
  CHECK(metadata("cl\xC3\xA9") == "\xE2\x82\xAC");
  for (const std::string& name : names) {
    INFO(name);
    REQUIRE(f.contains(name));
    CHECK(f.load<float, 1>(name)(1) == -2.0f);
  }
  // A multi-byte character cut short at the end is still refused.
  REQUIRE_THROWS_WITH(w.add("w\xC3", t), Contains("not valid UTF-8"));
  REQUIRE_THROWS_WITH(w.set_metadata("note", "caf\xE2\x82"), Contains("not valid UTF-8"));
}

TEST_CASE("safetensors boundaries of the data area tiling and of shapes", "[safetensors]") {
  // A gap of a single byte between two tensors is refused as unused bytes.
  require_rejected(make_file("{" + entry("w", "F32", "[4]", 0, 16) + "," + entry("b", "F32", "[2]", 17, 25) + "}",
                             zeros(25)),
                   {"unused bytes [16, 17)", "\"b\""});
  // An extent of exactly the largest index, in an empty tensor, is valid.
  const auto f = parse(make_file("{" + entry("e", "F32", "[9223372036854775807,0]", 0, 0) + "}", zeros(0)));
  CHECK(f.info("e").shape == std::vector<ta::index>{std::numeric_limits<ta::index>::max(), 0});
  CHECK(f.info("e").size() == 0);
  // One above it is refused.
  require_rejected(make_file("{" + entry("e", "F32", "[9223372036854775808,0]", 0, 0) + "}", zeros(0)),
                   {"\"e\"", "overflows"});
}

TEST_CASE("safetensors writer pads the header to a multiple of 8 with fewer than 8 spaces", "[safetensors]") {
  // One F32[1] tensor under names of 1 to 8 characters: the header text takes every length modulo 8, one
  // of them a multiple of 8 already, which must get no padding at all.
  ta::tensor<float, 1> t(1);
  t(0) = 3.0f;
  bool unpadded = false;
  for (std::size_t length = 1; length <= 8; ++length) {
    const std::string name(length, 'a');
    INFO("name " << name);
    io::safetensors_writer w;
    w.add(name, t);
    const bytes b = w.serialize();
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | b[static_cast<std::size_t>(i)];
    CHECK(n % 8 == 0);
    REQUIRE(b.size() == 8 + n + 4);
    const std::string header(b.begin() + 8, b.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    const std::size_t json_end = header.find_last_not_of(' ') + 1;
    CHECK(header[json_end - 1] == '}');
    CHECK(header.size() - json_end < 8);
    if (json_end == header.size()) unpadded = true;
    CHECK(parse(b).load<float, 1>(name)(0) == 3.0f);
  }
  CHECK(unpadded);  // the case of a header already a multiple of 8 was met
}
