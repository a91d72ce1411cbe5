// GLoRA (generalized LoRA; Chavan et al.), exactly as its official code computes it.
//
// A linear weight W0 (O, I) with an optional bias b0 (O) gets five support tensors A–E, all read from
// one store per layer (the supernet's weight entanglement) with maximum rank R:
//
//   store   shape    name          init (default)
//   Ad, Bd  (O, R)   glora_Ad/Bd   zeros
//   Au, Bu  (R, I)   glora_Au/Bu   kaiming-uniform (a = √5), or xavier-uniform
//   Cd      (I, R)   glora_Cd      zeros
//   Cu      (R, 1)   glora_Cu      kaiming-uniform, or xavier-uniform
//   D, E    (O)      glora_D/E     zeros
//
// A configuration (glora_config) picks one kind per support tensor, and each kind reads the store so:
//   lora(r), r ≤ R:  X = Xd[:, :r] · Xu[:r, :]   (A, B: (O, I); C: (I, 1))
//   vector:          Xd[:, 0], a column broadcast along the input dimension (C: (I, 1)); D, E: the whole (O)
//   scalar:          Xd[0, 0] (D, E: element 0)
//   none:            zero
// with A, B ∈ {lora, vector, scalar, none}, C ∈ {lora, vector, none}, D, E ∈ {vector, scalar, none}. Then
//   W_eff = W0 + W0 ⊙ A + B
//   b_eff = b0 + b0 ⊙ D + E + W0 · C        (without a bias: b_eff = E + W0 · C)
//   y     = x · W_effᵀ + b_eff
// The prompt term W0 · C always uses the frozen W0, and merge computes (W_eff, b_eff) from the original
// W0 and b0.
//
// The store's gradient has the store's type: backward fills the entries the configuration reads and
// sets every other entry to exactly zero (lora(r) touches only the first r columns of Xd and the first r
// rows of Xu; vector only column 0; scalar only element (0, 0)).
//
// Weight space (any weight rank 2..5, viewed as (O, F)):  delta_weight, delta_bias, delta_weight_vjp,
// delta_bias_vjp, merge, safe_merge.  Linear layers:  forward, backward — with A lora, the batch sees one
// GEMM against W_eff, formed from W0 in cache as the GEMM packs it; otherwise A is constant along the
// input dimension and everything stays in activation space. Neither forms W_eff in memory.
//
// Configuration space: glora_space (the choices per support tensor), make_glora_space(ranks) (the
// official search space), enumerate_glora_configs, random_glora_config (supernet training draws one per
// layer at every step), parameter_count(config, out, in) (the official search's rule), and a text form:
//   "A=lora_4,B=vector,C=none,D=scalar,E=vector"   (to_string / parse_glora_config; layers joined by ';')
//
// Example:
//   std::mt19937_64 gen(0);
//   auto store = tensor_adapters::make_glora<float>(768, 768, {/*max_rank=*/8}, gen);
//   auto space = tensor_adapters::make_glora_space(8);
//   tensor_adapters::glora_config config = tensor_adapters::random_glora_config(space, gen);
//   tensor_adapters::tensor<float, 2> y = tensor_adapters::forward(store, config, x, w0, b0);
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "detail/check.hpp"
#include "detail/gemm.hpp"
#include "init.hpp"
#include "parameters.hpp"
#include "tensor.hpp"

namespace tensor_adapters {

// ---------------------------------------------------------------------------------------------------
// Configuration

enum class glora_kind { none, scalar, vector, lora };

// One support tensor's kind; rank is read only for lora.
struct glora_choice {
  glora_kind kind = glora_kind::none;
  index rank = 0;

  static glora_choice lora(index r) { return {glora_kind::lora, r}; }
  static glora_choice vector() { return {glora_kind::vector, 0}; }
  static glora_choice scalar() { return {glora_kind::scalar, 0}; }
  static glora_choice none() { return {glora_kind::none, 0}; }
};

inline bool operator==(const glora_choice& a, const glora_choice& b) {
  return a.kind == b.kind && (a.kind != glora_kind::lora || a.rank == b.rank);
}
inline bool operator!=(const glora_choice& a, const glora_choice& b) { return !(a == b); }

// A layer's configuration: one kind per support tensor. The default reads nothing (W_eff = W0).
struct glora_config {
  glora_choice A, B, C, D, E;
};

inline bool operator==(const glora_config& a, const glora_config& b) {
  return a.A == b.A && a.B == b.B && a.C == b.C && a.D == b.D && a.E == b.E;
}
inline bool operator!=(const glora_config& a, const glora_config& b) { return !(a == b); }

// The choices a search (or supernet training) draws from, per support tensor.
struct glora_space {
  std::vector<glora_choice> A, B, C, D, E;
};

namespace detail {

inline bool glora_kind_known(glora_kind k) {
  return k == glora_kind::none || k == glora_kind::scalar || k == glora_kind::vector || k == glora_kind::lora;
}

// Whether support tensor `tensor` ('A'..'E') may take this kind at all.
inline bool glora_kind_allowed(char tensor, glora_kind k) {
  if (tensor == 'C') return k != glora_kind::scalar;
  if (tensor == 'D' || tensor == 'E') return k != glora_kind::lora;
  return true;
}

inline std::string glora_choice_text(const glora_choice& c) {
  switch (c.kind) {
    case glora_kind::lora:
      return "lora_" + std::to_string(c.rank);
    case glora_kind::vector:
      return "vector";
    case glora_kind::scalar:
      return "scalar";
    case glora_kind::none:
      return "none";
  }
  return "unknown(" + std::to_string(static_cast<int>(c.kind)) + ")";
}

// Checks one choice of support tensor `tensor` against the maximum rank R (R < 1: rank unchecked), which
// `bound` names in a message (empty: the store's maximum rank).
inline void check_glora_choice(const glora_choice& c, char tensor, index max_rank, const char* function,
                               const std::string& bound = {}) {
  TA_CHECK(glora_kind_known(c.kind), function,
           std::string("support tensor ") + tensor + " has an unknown kind (" +
               std::to_string(static_cast<int>(c.kind)) + ")");
  TA_CHECK(glora_kind_allowed(tensor, c.kind), function,
           std::string("support tensor ") + tensor + " cannot be " + glora_choice_text(c) +
               (tensor == 'C' ? " (C is lora, vector or none)" : " (D and E are vector, scalar or none)"));
  if (c.kind == glora_kind::lora) {
    TA_CHECK(c.rank >= 1 && (max_rank < 1 || c.rank <= max_rank), function,
             std::string("support tensor ") + tensor + " has lora rank " + std::to_string(c.rank) +
                 (max_rank < 1 ? std::string(" below 1")
                               : " outside [1, R] for " +
                                     (bound.empty() ? "the store's maximum rank R = " + std::to_string(max_rank)
                                                    : bound)));
  }
}

inline void check_glora_config(const glora_config& c, index max_rank, const char* function,
                               const std::string& bound = {}) {
  check_glora_choice(c.A, 'A', max_rank, function, bound);
  check_glora_choice(c.B, 'B', max_rank, function, bound);
  check_glora_choice(c.C, 'C', max_rank, function, bound);
  check_glora_choice(c.D, 'D', max_rank, function, bound);
  check_glora_choice(c.E, 'E', max_rank, function, bound);
}

}  // namespace detail

// "lora_4", "vector", "scalar" or "none".
inline std::string to_string(const glora_choice& c) { return detail::glora_choice_text(c); }

// "A=lora_4,B=vector,C=none,D=scalar,E=vector".
inline std::string to_string(const glora_config& c) {
  return "A=" + to_string(c.A) + ",B=" + to_string(c.B) + ",C=" + to_string(c.C) + ",D=" + to_string(c.D) +
         ",E=" + to_string(c.E);
}

// One configuration per layer, joined by ';'.
inline std::string to_string(const std::vector<glora_config>& configs) {
  std::string s;
  for (std::size_t i = 0; i < configs.size(); ++i) s += (i ? ";" : "") + to_string(configs[i]);
  return s;
}

namespace detail {

inline std::string glora_trim(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

inline std::vector<std::string> glora_split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t p = s.find(sep, start);
    parts.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) return parts;
    start = p + 1;
  }
}

inline glora_choice parse_glora_choice(const std::string& word, char tensor, const std::string& text) {
  const char* fn = "parse_glora_config";
  glora_choice c;
  // The official code's spellings "LoRA_<r>" and "constant" are accepted as well.
  if (word == "vector") {
    c = glora_choice::vector();
  } else if (word == "scalar" || word == "constant") {
    c = glora_choice::scalar();
  } else if (word == "none") {
    c = glora_choice::none();
  } else if (word.rfind("lora_", 0) == 0 || word.rfind("LoRA_", 0) == 0) {
    const std::string digits = word.substr(5);
    bool ok = !digits.empty() && digits.size() <= 9;
    for (char ch : digits) ok = ok && std::isdigit(static_cast<unsigned char>(ch));
    TA_CHECK(ok, fn, "\"" + word + "\" in \"" + text + "\" is not lora_<rank>");
    c = glora_choice::lora(static_cast<index>(std::stol(digits)));
  } else {
    fail(fn, std::string("unknown kind \"") + word + "\" for support tensor " + tensor + " in \"" + text +
                 "\" (expected lora_<rank>, vector, scalar or none)");
  }
  check_glora_choice(c, tensor, 0, fn);
  return c;
}

}  // namespace detail

// The inverse of to_string(glora_config): exactly the five fields A..E in that order, separated by
// commas, spaces around names, '=' and kinds ignored. Throws argument_error on anything else, on an unknown or illegal
// kind (scalar for C, lora for D or E) and on a lora rank below 1.
inline glora_config parse_glora_config(const std::string& text) {
  const char* fn = "parse_glora_config";
  const std::vector<std::string> fields = detail::glora_split(text, ',');
  TA_CHECK(fields.size() == 5, fn,
           "\"" + text + "\" has " + std::to_string(fields.size()) + " fields; expected A=…,B=…,C=…,D=…,E=…");
  glora_config c;
  glora_choice* slots[5] = {&c.A, &c.B, &c.C, &c.D, &c.E};
  for (std::size_t k = 0; k < 5; ++k) {
    const char tensor = static_cast<char>('A' + k);
    const std::string field = detail::glora_trim(fields[k]);
    const std::size_t eq = field.find('=');
    TA_CHECK(eq != std::string::npos && detail::glora_trim(field.substr(0, eq)) == std::string(1, tensor), fn,
             "field \"" + field + "\" of \"" + text + "\" must be " + std::string(1, tensor) + "=<kind>");
    *slots[k] = detail::parse_glora_choice(detail::glora_trim(field.substr(eq + 1)), tensor, text);
  }
  return c;
}

// The inverse of to_string(std::vector<glora_config>): layers separated by ';'. The empty string is
// zero layers.
inline std::vector<glora_config> parse_glora_configs(const std::string& text) {
  std::vector<glora_config> configs;
  if (detail::glora_trim(text).empty()) return configs;
  for (const std::string& layer : detail::glora_split(text, ';')) configs.push_back(parse_glora_config(layer));
  return configs;
}

// The official search space for lora ranks `ranks` (each ≥ 1, no repeats):
//   A, B: lora(r) for each r, vector, scalar, none;  C: lora(r) for each r, vector, none;
//   D, E: vector, scalar, none.
// For one rank that is 4·4·3·3·3 = 432 configurations. Throws argument_error on an empty list, a rank
// below 1 or a repeated rank.
inline glora_space make_glora_space(const std::vector<index>& ranks) {
  const char* fn = "make_glora_space";
  TA_CHECK(!ranks.empty(), fn, "the list of lora ranks is empty");
  glora_space s;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    TA_CHECK(ranks[i] >= 1, fn, "lora rank " + std::to_string(ranks[i]) + " must be at least 1");
    for (std::size_t j = 0; j < i; ++j)
      TA_CHECK(ranks[j] != ranks[i], fn, "lora rank " + std::to_string(ranks[i]) + " is listed twice");
    s.A.push_back(glora_choice::lora(ranks[i]));
  }
  s.C = s.A;
  s.A.push_back(glora_choice::vector());
  s.A.push_back(glora_choice::scalar());
  s.A.push_back(glora_choice::none());
  s.B = s.A;
  s.C.push_back(glora_choice::vector());
  s.C.push_back(glora_choice::none());
  s.D = {glora_choice::vector(), glora_choice::scalar(), glora_choice::none()};
  s.E = s.D;
  return s;
}
inline glora_space make_glora_space(index rank) { return make_glora_space(std::vector<index>{rank}); }

namespace detail {

// Checks a space: every list non-empty, every choice legal for its tensor and of rank ≤ max_rank
// (max_rank < 1: unchecked), no repeats.
inline void check_glora_space(const glora_space& s, index max_rank, const char* function) {
  const std::vector<glora_choice>* lists[5] = {&s.A, &s.B, &s.C, &s.D, &s.E};
  for (int k = 0; k < 5; ++k) {
    const char tensor = static_cast<char>('A' + k);
    const std::vector<glora_choice>& list = *lists[k];
    TA_CHECK(!list.empty(), function, std::string("the search space offers no choice for support tensor ") + tensor);
    for (std::size_t i = 0; i < list.size(); ++i) {
      check_glora_choice(list[i], tensor, max_rank, function);
      for (std::size_t j = 0; j < i; ++j)
        TA_CHECK(list[j] != list[i], function,
                 std::string("the search space lists ") + to_string(list[i]) + " twice for support tensor " + tensor);
    }
  }
}

}  // namespace detail

// The number of configurations of a space: |A|·|B|·|C|·|D|·|E|.
inline index glora_space_size(const glora_space& s) {
  return static_cast<index>(s.A.size() * s.B.size() * s.C.size() * s.D.size() * s.E.size());
}

// Every configuration of the space, A varying slowest and E fastest, each list in its own order.
// Throws argument_error if the space is not valid (see make_glora_space).
inline std::vector<glora_config> enumerate_glora_configs(const glora_space& s) {
  detail::check_glora_space(s, 0, "enumerate_glora_configs");
  std::vector<glora_config> all;
  all.reserve(static_cast<std::size_t>(glora_space_size(s)));
  for (const auto& a : s.A)
    for (const auto& b : s.B)
      for (const auto& c : s.C)
        for (const auto& d : s.D)
          for (const auto& e : s.E) all.push_back({a, b, c, d, e});
  return all;
}

namespace detail {

// Uniform on {0, …, n − 1} from the generator's raw bits (the same on every platform).
template <class Generator>
std::size_t glora_uniform_index(std::size_t n, Generator& gen) {
  const std::size_t k = static_cast<std::size_t>(uniform01(gen) * static_cast<double>(n));
  return k < n ? k : n - 1;
}

}  // namespace detail

// A configuration drawn uniformly from the space (each support tensor's choice uniform and independent),
// as supernet training draws one per layer at every step. Reproducible for a given generator state.
// Throws argument_error if the space is not valid.
template <class Generator>
glora_config random_glora_config(const glora_space& s, Generator& gen) {
  detail::check_glora_space(s, 0, "random_glora_config");
  glora_config c;
  c.A = s.A[detail::glora_uniform_index(s.A.size(), gen)];
  c.B = s.B[detail::glora_uniform_index(s.B.size(), gen)];
  c.C = s.C[detail::glora_uniform_index(s.C.size(), gen)];
  c.D = s.D[detail::glora_uniform_index(s.D.size(), gen)];
  c.E = s.E[detail::glora_uniform_index(s.E.size(), gen)];
  return c;
}

namespace detail {

// The largest out and in whose parameter counts stay exact: each term is at most r·(O + I) with
// r ≤ min(O, I), so bounding O and I by 2^30 keeps every count, and their sum for one layer, in an index.
constexpr index glora_max_extent = index(1) << 30;

// The official search's count for one support tensor of a (rows, cols) matrix: lora r·(rows + cols),
// vector rows, scalar 1, none 0.
inline index glora_choice_parameters(const glora_choice& c, index rows, index cols) {
  switch (c.kind) {
    case glora_kind::lora:
      return c.rank * (rows + cols);
    case glora_kind::vector:
      return rows;
    case glora_kind::scalar:
      return 1;
    case glora_kind::none:
      return 0;
  }
  return 0;
}

}  // namespace detail

// The trainable parameters a configuration uses in a layer (out, in), by the official search's rule:
// A and B: lora r·(O + I), vector O, scalar 1, none 0;  C: lora r·(I + 1), vector I, none 0;
// D and E: vector O, scalar 1, none 0.
// Throws argument_error on an illegal configuration, a size below 1, a lora rank above min(out, in)
// (no store of the layer can hold it), or a count more than an index can count.
inline index parameter_count(const glora_config& c, index out, index in) {
  const char* fn = "glora parameter_count";
  TA_CHECK(out >= 1 && in >= 1, fn,
           "layer (" + std::to_string(out) + ", " + std::to_string(in) + ") must not be empty");
  detail::check_glora_config(c, std::min(out, in), fn,
                             "the layer (" + std::to_string(out) + ", " + std::to_string(in) +
                                 "), R = min(out, in) = " + std::to_string(std::min(out, in)));
  TA_CHECK(out <= detail::glora_max_extent && in <= detail::glora_max_extent, fn,
           "layer (" + std::to_string(out) + ", " + std::to_string(in) + ") has a parameter count beyond an index");
  return detail::glora_choice_parameters(c.A, out, in) + detail::glora_choice_parameters(c.B, out, in) +
         detail::glora_choice_parameters(c.C, in, 1) + detail::glora_choice_parameters(c.D, out, 1) +
         detail::glora_choice_parameters(c.E, out, 1);
}

// ---------------------------------------------------------------------------------------------------
// The store

enum class glora_init {
  kaiming_uniform,  // Au, Bu, Cu ~ kaiming_uniform_(a = √5): U(±1/sqrt(fan_in)), fan_in = I (Cu: 1)
  xavier_uniform,   // Au, Bu ~ U(±sqrt(6 / (I + R))), Cu ~ U(±sqrt(6 / (1 + R))) (the vision code's choice)
};

struct glora_options {
  index max_rank = 8;  // R
  glora_init init = glora_init::kaiming_uniform;
};

// The per-layer store. Parameter names (for_each_parameter order): glora_Ad, glora_Au, glora_Bd,
// glora_Bu, glora_Cd, glora_Cu, glora_D, glora_E — the official module's Ad, Au, … with a glora_ prefix.
template <class T>
struct glora {
  tensor<T, 2> Ad;  // (O, R)
  tensor<T, 2> Au;  // (R, I)
  tensor<T, 2> Bd;  // (O, R)
  tensor<T, 2> Bu;  // (R, I)
  tensor<T, 2> Cd;  // (I, R)
  tensor<T, 2> Cu;  // (R, 1)
  tensor<T, 1> D;   // (O)
  tensor<T, 1> E;   // (O)
};

template <class T>
index max_rank(const glora<T>& a) {
  return a.Ad.dimension(1);
}

// A new store for a weight (out, in) with maximum rank R = options.max_rank: the down factors, D and E
// are zero and the up factors are drawn (Au, then Bu, then Cu) from `gen`, so every configuration of a
// new store is an exact no-op. Throws argument_error if a size is < 1 or R > min(out, in).
template <class T, class Generator>
glora<T> make_glora(index out, index in, const glora_options& options, Generator& gen) {
  const char* fn = "make_glora";
  const index r = options.max_rank;
  TA_CHECK(out >= 1 && in >= 1, fn, "weight (" + std::to_string(out) + ", " + std::to_string(in) + ") must not be empty");
  TA_CHECK(r >= 1 && r <= std::min(out, in), fn,
           "maximum rank " + std::to_string(r) + " must be in [1, min(out, in)] for a weight (" +
               std::to_string(out) + ", " + std::to_string(in) + ")");
  TA_CHECK(options.init == glora_init::kaiming_uniform || options.init == glora_init::xavier_uniform, fn,
           "unknown initialisation " + std::to_string(static_cast<int>(options.init)));
  glora<T> a;
  a.Ad.resize(out, r);
  a.Au.resize(r, in);
  a.Bd.resize(out, r);
  a.Bu.resize(r, in);
  a.Cd.resize(in, r);
  a.Cu.resize(r, 1);
  a.D.resize(out);
  a.E.resize(out);
  a.Ad.setZero();
  a.Bd.setZero();
  a.Cd.setZero();
  a.D.setZero();
  a.E.setZero();
  if (options.init == glora_init::kaiming_uniform) {
    const double a5 = std::sqrt(5.0);
    fill_kaiming_uniform(a.Au, in, a5, gen);
    fill_kaiming_uniform(a.Bu, in, a5, gen);
    fill_kaiming_uniform(a.Cu, 1, a5, gen);
  } else {
    fill_xavier_uniform(a.Au, in, r, gen);
    fill_xavier_uniform(a.Bu, in, r, gen);
    fill_xavier_uniform(a.Cu, 1, r, gen);
  }
  return a;
}

// The same for a weight of any rank: shape (O, I1, …, Ik) is treated as (O, I1·…·Ik). Throws
// argument_error also if an extent is < 1 or the fan-in is more than an index can count.
// (N is a std::size_t so that it is deduced from a shape<N> argument.)
template <class T, std::size_t N, class Generator>
glora<T> make_glora(const std::array<index, N>& weight_shape, const glora_options& options, Generator& gen) {
  static_assert(N >= 2, "a GLoRA weight has rank 2 or more");
  const index fan_in = detail::bounded_product([&](int d) { return weight_shape[std::size_t(d)]; }, 1, int(N),
                                                std::numeric_limits<index>::max());
  TA_CHECK(fan_in > 0, "make_glora",
           "weight shape " + detail::dims_string(weight_shape, int(N)) +
               " needs extents of at least 1 and a fan-in an index can count");
  return make_glora<T>(weight_shape[0], fan_in, options, gen);
}

template <class T, class F>
void for_each_parameter(glora<T>& a, F&& fn) {
  fn("glora_Ad", a.Ad);
  fn("glora_Au", a.Au);
  fn("glora_Bd", a.Bd);
  fn("glora_Bu", a.Bu);
  fn("glora_Cd", a.Cd);
  fn("glora_Cu", a.Cu);
  fn("glora_D", a.D);
  fn("glora_E", a.E);
}
template <class T, class F>
void for_each_parameter(const glora<T>& a, F&& fn) {
  fn("glora_Ad", a.Ad);
  fn("glora_Au", a.Au);
  fn("glora_Bd", a.Bd);
  fn("glora_Bu", a.Bu);
  fn("glora_Cd", a.Cd);
  fn("glora_Cu", a.Cu);
  fn("glora_D", a.D);
  fn("glora_E", a.E);
}
template <class T, class F>
void for_each_parameter(glora<T>& params, const glora<T>& grads, F&& fn) {
  fn("glora_Ad", params.Ad, grads.Ad);
  fn("glora_Au", params.Au, grads.Au);
  fn("glora_Bd", params.Bd, grads.Bd);
  fn("glora_Bu", params.Bu, grads.Bu);
  fn("glora_Cd", params.Cd, grads.Cd);
  fn("glora_Cu", params.Cu, grads.Cu);
  fn("glora_D", params.D, grads.D);
  fn("glora_E", params.E, grads.E);
}

// Scratch for forward, backward and the weight-space functions. Buffers only grow: once a forward and a
// backward have served a layer, batch size and configuration, every later call of them (or smaller
// ones) runs without allocating. (A backward alone does not size the forward's buffers.)
template <class T>
struct glora_workspace {
  std::vector<T> weight;    // (O, I): W_eff for safe_merge
  std::vector<T> gw;        // (O, I): dyᵀ · x, then W0 ⊙ gW; or (n, O): dy ⊙ (1 + a)ᵀ
  std::vector<T> bias;      // (O): b_eff, or Σ_rows dy
  std::vector<T> col;       // (I): C as a column, or W0ᵀ · gb
  std::vector<T> h;         // (n, r) or 2 × (n): x · Bu[:r]ᵀ, or row sums
  std::vector<T> dh;        // (n, r) or 2 × (O): dy · Bd[:, :r], or per-output factors
  std::vector<T> partials;  // per thread: its shares of the reductions over row blocks
  std::vector<T> factors;   // A's and B's factors laid along the matrix product's lanes (glora_gemm)
  // z = x · W0ᵀ (n, O), which a linear forward with A vector or scalar computes and its backward needs
  // again, with what it was computed from: a copy of x (n, I) and w0's address (null: z holds nothing).
  // The backward uses z only while x's values are the same, bit for bit, and w0 the same array (W0 is
  // frozen: its values are not compared); otherwise it computes z again. A forward keeps z only once
  // the workspace has served a backward (keep_z): a workspace used for inference alone never pays
  // for the copies.
  std::vector<T> z, z_x;
  const T* z_w0 = nullptr;
  index z_rows = 0, z_out = 0, z_in = 0;
  bool keep_z = false;
};

namespace detail {

struct glora_dims {
  index out, in, rank;
};

template <class T>
glora_dims check_glora_store(const glora<T>& a, const char* function) {
  const index out = a.Ad.dimension(0), r = a.Ad.dimension(1), in = a.Au.dimension(1);
  TA_CHECK(out >= 1 && r >= 1 && in >= 1, function,
           "the store is empty (Ad " + shape_string(a.Ad) + ", Au " + shape_string(a.Au) + ")");
  const bool ok = a.Au.dimension(0) == r && a.Bd.dimension(0) == out && a.Bd.dimension(1) == r &&
                  a.Bu.dimension(0) == r && a.Bu.dimension(1) == in && a.Cd.dimension(0) == in &&
                  a.Cd.dimension(1) == r && a.Cu.dimension(0) == r && a.Cu.dimension(1) == 1 &&
                  a.D.dimension(0) == out && a.E.dimension(0) == out;
  TA_CHECK(ok, function,
           "the store's shapes disagree: Ad " + shape_string(a.Ad) + ", Au " + shape_string(a.Au) + ", Bd " +
               shape_string(a.Bd) + ", Bu " + shape_string(a.Bu) + ", Cd " + shape_string(a.Cd) + ", Cu " +
               shape_string(a.Cu) + ", D " + shape_string(a.D) + ", E " + shape_string(a.E) +
               "; expected (O, R), (R, I), (O, R), (R, I), (I, R), (R, 1), (O), (O)");
  TA_CHECK(r <= std::min(out, in), function,
           "the store has rank " + std::to_string(r) + " (Ad " + shape_string(a.Ad) + ", Au " + shape_string(a.Au) +
               "), which must be at most min(O, I) = " + std::to_string(std::min(out, in)));
  return {out, in, r};
}

// The weight (O, I1, …, Ik) seen as (O, F) must match the store: O rows and F = I.
template <class Weight>
void check_glora_weight(const glora_dims& d, const Weight& w, const char* function, const char* name) {
  const index fan_in = bounded_product([&](int k) { return w.dimension(k); }, 1, Weight::NumIndices, d.in);
  TA_CHECK(w.dimension(0) == d.out && fan_in == d.in, function,
           std::string(name) + " has shape " + shape_string(w) + " but the store needs (" + std::to_string(d.out) +
               ", …) with fan-in " + std::to_string(d.in));
}

template <class Vector>
void check_glora_vector(const Vector& v, index size, const char* function, const char* name) {
  TA_CHECK(v.dimension(0) == size, function,
           std::string(name) + " has shape " + shape_string(v) + " but must be (" + std::to_string(size) + ")");
}

// The checks every merge makes (of any weight type): the store, the configuration, w0 against the store,
// w_eff against w0 and b_eff against the output extent.
template <class T, class Weight, class WeightOut, class BiasOut>
glora_dims check_glora_merge(const glora<T>& a, const glora_config& c, const Weight& w0, const WeightOut& w_eff,
                             const BiasOut& b_eff, const char* function) {
  const glora_dims d = check_glora_store(a, function);
  check_glora_config(c, d.rank, function);
  check_glora_weight(d, w0, function, "w0");
  TA_CHECK(w_eff.dimensions() == w0.dimensions(), function,
           "w_eff has shape " + shape_string(w_eff) + " but w0 " + shape_string(w0));
  check_glora_vector(b_eff, d.out, function, "b_eff");
  return d;
}

inline void check_glora_matrix(const Eigen::DSizes<index, 2>& dims, index rows, index cols, const char* function,
                               const char* name) {
  TA_CHECK(dims[0] == rows && dims[1] == cols, function,
           std::string(name) + " has shape " + dims_string(dims, 2) + " but must be (" + std::to_string(rows) +
               ", " + std::to_string(cols) + ")");
}

template <class T>
void glora_grow(std::vector<T>& buffer, index size) {
  if (static_cast<index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
}

template <class T>
void ensure_store_shape(const glora<T>& a, glora<T>& g) {
  if (g.Ad.dimensions() != a.Ad.dimensions()) g.Ad.resize(a.Ad.dimensions());
  if (g.Au.dimensions() != a.Au.dimensions()) g.Au.resize(a.Au.dimensions());
  if (g.Bd.dimensions() != a.Bd.dimensions()) g.Bd.resize(a.Bd.dimensions());
  if (g.Bu.dimensions() != a.Bu.dimensions()) g.Bu.resize(a.Bu.dimensions());
  if (g.Cd.dimensions() != a.Cd.dimensions()) g.Cd.resize(a.Cd.dimensions());
  if (g.Cu.dimensions() != a.Cu.dimensions()) g.Cu.resize(a.Cu.dimensions());
  if (g.D.dimensions() != a.D.dimensions()) g.D.resize(a.D.dimensions());
  if (g.E.dimensions() != a.E.dimensions()) g.E.resize(a.E.dimensions());
}

// out (m, I) = [w0 +] w0 ⊙ (ad · au) [+ bd · bu] in one pass over w0 and out, for factors of ranks ra ≥ 1
// and rb ≥ 0 (0: no B term): ad (m, ra) and bd (m, rb) with leading dimension R, au (ra, I), bu (rb, I).
// Each element's sums run over r in order from zero, as a matrix product's would. Four vector
// columns at a time, so that eight independent FMA chains hide each one's latency; in column blocks
// whose au and bu rows fit in 16 KB, so that they are read from L1 for every row of w0; rows of w0 and
// out prefetched four rows ahead. Written over simd.hpp; Isa = scalar_isa is its reference.
template <class T, class Isa = native_isa>
void glora_lora_rows(index m, index I, index R, index ra, const T* ad, const T* au, index rb, const T* bd, const T* bu,
                     const T* w0, bool add_w0, T* out) {
  using S = simd<T, Isa>;
  using reg = typename S::reg;
  constexpr int W = S::width, V = 4;
  const index block = std::max<index>(V * W, index(16384 / sizeof(T)) / (ra + rb) / (V * W) * (V * W));
  for (index i0 = 0; i0 < I; i0 += block) {
    const index i1 = std::min(I, i0 + block);
    for (index o = 0; o < m; ++o) {
      const T* ar = ad + o * R;
      const T* br = bd + o * R;
      const T* wr = w0 + o * I;
      T* orow = out + o * I;
      // The rows four ahead, fetched now: each row's share of a column block is a short run (about 1 KB)
      // that the hardware prefetcher does not follow from one row to the next, and W0 and W_eff come
      // from beyond L2 (after a layer's GEMM the pass waited on them about a third of its time).
      const T* w_ahead = o + 4 < m ? wr + 4 * I : wr;
      T* out_ahead = o + 4 < m ? orow + 4 * I : orow;
      index i = i0;
      for (; i + V * W <= i1; i += V * W) {
        for (int v = 0; v < V; ++v) {
          __builtin_prefetch(w_ahead + i + v * W, 0, 0);
          __builtin_prefetch(out_ahead + i + v * W, 1, 0);
        }
        reg acc_a[V], acc_b[V];
        for (int v = 0; v < V; ++v) acc_a[v] = S::zero(), acc_b[v] = S::zero();
        for (index r = 0; r < ra; ++r) {
          const reg x = S::broadcast(ar[r]);
          for (int v = 0; v < V; ++v) acc_a[v] = S::fma(x, S::load(au + r * I + i + v * W), acc_a[v]);
        }
        for (index r = 0; r < rb; ++r) {
          const reg x = S::broadcast(br[r]);
          for (int v = 0; v < V; ++v) acc_b[v] = S::fma(x, S::load(bu + r * I + i + v * W), acc_b[v]);
        }
        for (int v = 0; v < V; ++v) {
          const reg w = S::load(wr + i + v * W);
          const reg y = add_w0 ? S::fma(w, acc_a[v], w) : S::mul(w, acc_a[v]);
          S::store(orow + i + v * W, S::add(y, acc_b[v]));
        }
      }
      // One column at a time, fused exactly where the registers above are (scalar_isa's fma is fused
      // where the target has FMA instructions, as every vector set here has), so that every column
      // rounds alike, here and on the forward's panels (glora_panel_sum).
      using one = simd<T, scalar_isa>;
      for (; i < i1; ++i) {
        T sa = T(0), sb = T(0);
        for (index r = 0; r < ra; ++r) sa = one::fma(ar[r], au[r * I + i], sa);
        for (index r = 0; r < rb; ++r) sb = one::fma(br[r], bu[r * I + i], sb);
        orow[i] = (add_w0 ? one::fma(wr[i], sa, wr[i]) : wr[i] * sa) + sb;
      }
    }
  }
}

// Rows [o0, o1) of W0 ⊙ A + B, or with add_w0 of W0 + W0 ⊙ A + B (the official order of additions), into
// out (o1 − o0, I). w0 points at row o0 of W0.
template <class T>
void glora_weight_rows(const glora<T>& a, const glora_config& c, const glora_dims& d, index o0, index o1,
                       const T* w0, bool add_w0, T* out) {
  const index I = d.in, R = d.rank, m = o1 - o0, n = m * I;
  const glora_choice& A = c.A;
  const glora_choice& B = c.B;
  if (A.kind == glora_kind::lora) {
    const index rb = B.kind == glora_kind::lora ? B.rank : 0;  // a lora B joins the same pass
    glora_lora_rows(m, I, R, A.rank, a.Ad.data() + o0 * R, a.Au.data(), rb, a.Bd.data() + o0 * R, a.Bu.data(), w0,
                    add_w0, out);
  } else if (A.kind == glora_kind::vector) {
    for (index o = 0; o < m; ++o) {
      const T s = a.Ad.data()[(o0 + o) * R];
      const T* wr = w0 + o * I;
      T* orow = out + o * I;
      if (add_w0) {
        for (index i = 0; i < I; ++i) orow[i] = wr[i] + wr[i] * s;
      } else {
        for (index i = 0; i < I; ++i) orow[i] = wr[i] * s;
      }
    }
  } else if (A.kind == glora_kind::scalar) {
    const T s = a.Ad.data()[0];
    if (add_w0) {
      for (index k = 0; k < n; ++k) out[k] = w0[k] + w0[k] * s;
    } else {
      for (index k = 0; k < n; ++k) out[k] = w0[k] * s;
    }
  } else if (add_w0) {
    std::copy(w0, w0 + n, out);
  } else {
    std::fill(out, out + n, T(0));
  }
  if (B.kind == glora_kind::lora && A.kind != glora_kind::lora) {
    gemm<T>(false, false, m, I, B.rank, T(1), a.Bd.data() + o0 * R, R, a.Bu.data(), I, T(1), out, I);
  } else if (B.kind == glora_kind::vector) {
    for (index o = 0; o < m; ++o) {
      const T s = a.Bd.data()[(o0 + o) * R];
      T* orow = out + o * I;
      for (index i = 0; i < I; ++i) orow[i] += s;
    }
  } else if (B.kind == glora_kind::scalar) {
    const T s = a.Bd.data()[0];
    for (index k = 0; k < n; ++k) out[k] += s;
  }
}

// W_eff = W0 + W0 ⊙ A + B for a linear layer's matrix products, formed on the GEMM's packed panels of W0
// (gemm_hooks::edit_b) rather than in memory: op(B) of the product is W0ᵀ (forward, y = x · W_effᵀ: W_eff's
// rows along the panels' lanes, its columns along the steps) or W0 (backward, dx = dy · W_eff: columns
// along the lanes). A's and B's values on a panel row are sums over their ranks of one factor along the
// lanes times one along the steps: a lora X = Xd · Xu puts one of Xd's columns or Xu's rows on each side;
// B as a vector or scalar is rank 1 against ones. Each sum runs over r in order from zero and each value
// is (w + w·a) + b, as glora_lora_rows forms them: the same W_eff, bit for bit.
template <class T>
struct glora_panel_term {
  const T* lanes = nullptr;  // (rank, ld): the factor along the lanes, zero past the last one
  index ld = 0;
  const T* steps = nullptr;  // its partner, element (p, r) at steps[p·step_p + r·step_r]
  index step_p = 0, step_r = 0, rank = 0;
};

// The context of a linear layer's GEMM hooks (gemm_hooks).
template <class T>
struct glora_gemm {
  glora_panel_term<T> a, b;  // edit_b: W_eff's A and B terms on W0's panels (glora_panel_factors)
  // finish_c, forward only: y[i, o] = (z + z·av[o]) + bias[o] + sx[i]·bv[o] for each finished tile z of
  // x · W0ᵀ or x · W_effᵀ, a null av or sx leaving its term out; y (rows ldy apart) may be the product's C.
  const T* av = nullptr;
  const T* bias = nullptr;
  const T* sx = nullptr;
  const T* bv = nullptr;
  T* y = nullptr;
  index ldy = 0;
};

// acc[q] += Σ_r t.steps(p0 + q, r) · t.lanes[r, col : col + NV·width]. Always inlined: called as a
// function, the accumulators passed by reference lived in memory, and forming W_eff on the panels cost
// 0.06× a 512×768·768×768 product instead of 0.01×.
template <class T, int P, int NV>
__attribute__((always_inline)) inline void glora_panel_sum(const glora_panel_term<T>& t, index p0, index col,
                                                           typename simd<T, native_isa>::reg (&acc)[P][NV]) {
  using S = simd<T, native_isa>;
  for (index r = 0; r < t.rank; ++r) {
    typename S::reg l[NV];
    for (int v = 0; v < NV; ++v) l[v] = S::load(t.lanes + r * t.ld + col + v * S::width);
    for (int q = 0; q < P; ++q) {
      const typename S::reg x = S::broadcast(t.steps[(p0 + q) * t.step_p + r * t.step_r]);
      for (int v = 0; v < NV; ++v) acc[q][v] = S::fma(x, l[v], acc[q][v]);
    }
  }
}

// Rows [p0, p0 + P) of one panel (`rows`, NR = NV·width values per row) whose lanes are columns col … of op(B).
template <class T, int P, int NV>
void glora_edit_rows(const glora_gemm<T>& e, index p0, index col, T* rows) {
  using S = simd<T, native_isa>;
  typename S::reg acc_a[P][NV], acc_b[P][NV];
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NV; ++v) acc_a[q][v] = S::zero(), acc_b[q][v] = S::zero();
  glora_panel_sum<T, P, NV>(e.a, p0, col, acc_a);
  glora_panel_sum<T, P, NV>(e.b, p0, col, acc_b);
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NV; ++v) {
      T* at = rows + (q * NV + v) * S::width;
      const typename S::reg w = S::load(at);
      S::store(at, S::add(S::fma(w, acc_a[q][v], w), acc_b[q][v]));
    }
}

// gemm_hooks::edit_b: op(B)[pc : pc + kc, c0 : c0 + nc], held as kc×NR panels of W0's values, becomes W_eff's.
// P rows at a time, P·NV accumulators for each of A and B within the dot kernels' register budget.
template <class T>
void glora_edit_panels(const void* context, index pc, index kc, index c0, index nc, T* panels) {
  constexpr int NV = gemm_shape<T, native_isa>::nv, NR = NV * simd<T, native_isa>::width;
  constexpr int P = std::max(1, gemm_shape<T, native_isa>::dot_acc / (2 * NV));
  const auto& e = *static_cast<const glora_gemm<T>*>(context);
  for (index c = 0; c < nc; c += NR) {
    T* panel = panels + c * kc;
    index p = 0;
    for (; p + P <= kc; p += P) glora_edit_rows<T, P, NV>(e, pc + p, c0 + c, panel + p * NR);
    for (; p < kc; ++p) glora_edit_rows<T, 1, NV>(e, pc + p, c0 + c, panel + p * NR);
  }
}

// The edit for A lora and B of any kind, its lane factors copied into `buffer`: with lanes_out W_eff's
// rows (O) lie along the lanes (op(B) = W0ᵀ), else its columns (I; op(B) = W0).
template <class T>
glora_gemm<T> glora_panel_factors(const glora<T>& a, const glora_config& c, const glora_dims& d,
                                        bool lanes_out, std::vector<T>& buffer) {
  const index O = d.out, I = d.in, R = d.rank, NR = gemm_panel_width<T>;
  const index lanes = lanes_out ? O : I, ld = (lanes + NR - 1) / NR * NR;
  const index ra = c.A.rank, rb = c.B.kind == glora_kind::lora ? c.B.rank : c.B.kind == glora_kind::none ? 0 : 1;
  glora_grow(buffer, (ra + rb) * ld + 1);
  std::fill(buffer.begin(), buffer.begin() + (ra + rb) * ld + 1, T(0));
  T* one = buffer.data() + (ra + rb) * ld;
  *one = T(1);
  // Rank r of a lora X = Xd · Xu: Xd[:, r] along the steps and Xu[r, :] along the lanes, or the reverse.
  const auto lora = [&](const tensor<T, 2>& xd, const tensor<T, 2>& xu, index rank, T* out) {
    for (index r = 0; r < rank; ++r)
      for (index l = 0; l < lanes; ++l) out[r * ld + l] = lanes_out ? xd.data()[l * R + r] : xu.data()[r * I + l];
    return lanes_out ? glora_panel_term<T>{out, ld, xu.data(), 1, I, rank} : glora_panel_term<T>{out, ld, xd.data(), R, 1, rank};
  };
  glora_gemm<T> e;
  T* bl = buffer.data() + ra * ld;
  e.a = lora(a.Ad, a.Au, ra, buffer.data());
  if (c.B.kind == glora_kind::lora) {
    e.b = lora(a.Bd, a.Bu, rb, bl);
  } else if (c.B.kind == glora_kind::vector && lanes_out) {  // Bd[:, 0] along the lanes, against ones
    for (index o = 0; o < O; ++o) bl[o] = a.Bd.data()[o * R];
    e.b = {bl, ld, one, 0, 0, 1};
  } else if (c.B.kind != glora_kind::none) {  // ones along the lanes, against Bd[:, 0] or Bd[0, 0]
    std::fill(bl, bl + lanes, T(1));
    e.b = {bl, ld, a.Bd.data(), c.B.kind == glora_kind::vector ? R : 0, 0, 1};
  }
  return e;
}

// gemm_hooks::finish_c of the linear forward: y's rows [r0, r0 + mr), columns [c0, c0 + nc) from the
// finished tile z of the product (glora_gemm).
template <class T>
void glora_finish_tile(const void* context, index r0, index mr, index c0, index nc, T* z, index ldz) {
  const auto& g = *static_cast<const glora_gemm<T>*>(context);
  const T* b = g.bias + c0;
  const T* av = g.av + (g.av != nullptr ? c0 : 0);
  const T* bv = g.bv + (g.bv != nullptr ? c0 : 0);
  for (index r = 0; r < mr; ++r) {
    const T* zr = z + r * ldz;
    T* yr = g.y + (r0 + r) * g.ldy + c0;
    if (g.av == nullptr) {
      for (index t = 0; t < nc; ++t) yr[t] = zr[t] + b[t];
    } else if (g.sx == nullptr) {
      for (index t = 0; t < nc; ++t) yr[t] = (zr[t] + zr[t] * av[t]) + b[t];
    } else {
      const T sx = g.sx[r0 + r];
      for (index t = 0; t < nc; ++t) yr[t] = (zr[t] + zr[t] * av[t]) + b[t] + sx * bv[t];
    }
  }
}

// How a pass over the O·I work is split: `blocks` blocks of `step` rows (the last may be shorter), each
// about `bytes` of each operand (by default 2 MiB, the size of a core's L2) so that a block stays in cache
// between the products and elementwise steps applied to it, and `threads` threads (with OpenMP, outside
// a parallel region and for weights of at least 2^17 elements: up to omp_get_max_threads(), the block
// count then a multiple of it; else 1).
struct glora_plan {
  index step, blocks;
  int threads;
};

template <class T>
glora_plan glora_blocks(const glora_dims& d, index bytes = 2097152) {
  const index per_block = std::max<index>(1, static_cast<index>(bytes / sizeof(T)) / d.in);  // rows
  index blocks = (d.out + per_block - 1) / per_block;
  int threads = 1;
#ifdef _OPENMP
  if (!omp_in_parallel() && d.out * d.in >= 131072) {
    threads = static_cast<int>(std::max<index>(1, std::min<index>(omp_get_max_threads(), d.out)));
    blocks = (blocks + threads - 1) / threads * threads;
  }
#endif
  const index step = (d.out + blocks - 1) / blocks;
  blocks = (d.out + step - 1) / step;
  return {step, blocks, static_cast<int>(std::min<index>(threads, blocks))};
}

// Runs body(first_block, end_block) over contiguous chunks of `blocks` row blocks on `threads` threads;
// returns the number of threads that ran (chunk t of n is [blocks·t/n, blocks·(t+1)/n)).
template <class Body>
int glora_parallel_blocks(index blocks, int threads, Body&& body) {
  int team = 1;
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      if (t == 0) team = n;
      body(t, blocks * t / n, blocks * (t + 1) / n);
    }
    return team;
  }
#else
  (void)threads;
#endif
  body(0, index(0), blocks);
  return team;
}

// Runs body(begin, end) over [0, total) in contiguous chunks, one per thread when OpenMP is on, the
// call is outside a parallel region and `work` (elements touched) is at least 2^20; else in one call.
// (A pass over fewer elements takes tens of microseconds on one thread; a parallel region can cost a
// scheduler time slice when another process holds a core.)
template <class Body>
void glora_parallel_for(index total, index work, Body&& body) {
#ifdef _OPENMP
  if (total > 1 && work >= 1048576 && !omp_in_parallel() && omp_get_max_threads() > 1) {
    const int threads = static_cast<int>(std::min<index>(omp_get_max_threads(), total));
#pragma omp parallel num_threads(threads)
    {
      const index t = omp_get_thread_num(), n = omp_get_num_threads();
      body(total * t / n, total * (t + 1) / n);
    }
    return;
  }
#else
  (void)work;
#endif
  body(index(0), total);
}

// C as a column (I) into col; false when C is none.
template <class T>
bool glora_prompt_column(const glora<T>& a, const glora_config& c, const glora_dims& d, T* col) {
  const index I = d.in, R = d.rank;
  if (c.C.kind == glora_kind::lora) {
    gemm<T>(false, false, I, 1, c.C.rank, T(1), a.Cd.data(), R, a.Cu.data(), 1, T(0), col, 1);
    return true;
  }
  if (c.C.kind == glora_kind::vector) {
    for (index i = 0; i < I; ++i) col[i] = a.Cd.data()[i * R];
    return true;
  }
  return false;
}

// The layer's effective weight and bias:
//   out_w (O, I) = [W0 +] W0 ⊙ A + B              (skipped when out_w is null; in row blocks)
//   out_b (O)    = [b0 +] b0 ⊙ D + E + W0 · C      (skipped when out_b is null; b0 == nullptr: no bias)
// the bracketed terms only with add_base. col: scratch of I elements. The bias, prompt term included, is
// formed before the weight, so out_w and out_b may be w0 and b0 themselves (every value of out_w is then
// computed from the w0 value it replaces, and the prompt term reads W0 before it is overwritten).
template <class T>
void glora_layer(const glora<T>& a, const glora_config& c, const glora_dims& d, const T* w0, const T* b0,
                 bool add_base, T* col, T* out_w, T* out_b) {
  const index O = d.out, I = d.in;
  bool prompt = false;
  if (out_b != nullptr) {
    for (index o = 0; o < O; ++o) {
      T v = T(0);
      if (b0 != nullptr) {
        const T dv = c.D.kind == glora_kind::vector   ? a.D.data()[o]
                     : c.D.kind == glora_kind::scalar ? a.D.data()[0]
                                                      : T(0);
        v = add_base ? b0[o] + b0[o] * dv : b0[o] * dv;
      }
      if (c.E.kind == glora_kind::vector) v += a.E.data()[o];
      if (c.E.kind == glora_kind::scalar) v += a.E.data()[0];
      out_b[o] = v;
    }
    prompt = glora_prompt_column(a, c, d, col);
  }
  // The prompt term W0 · C (a one-column product, split by output rows over the threads).
  if (prompt)
    glora_parallel_for(O, O * I, [&](index o0, index o1) {
      gemm<T>(false, false, o1 - o0, 1, I, T(1), w0 + o0 * I, I, col, 1, T(1), out_b + o0, 1);
    });
  if (out_w != nullptr) {
    const glora_plan plan = glora_blocks<T>(d);
    const index step = plan.step;
    glora_parallel_blocks(plan.blocks, plan.threads, [&](int, index first, index end) {
      for (index b = first; b < end; ++b) {
        const index o0 = b * step, o1 = std::min(O, o0 + step);
        glora_weight_rows(a, c, d, o0, o1, w0 + o0 * I, add_base, out_w + o0 * I);
      }
    });
  }
}

// The gradient of one factored support tensor X (rows, cols) read by choice `k` from (Xd, Xu), given
// rows [o0, o0 + m) of G = ∂L/∂X with leading dimension ldg:
//   lora:   gXd[o0 : o0 + m, :r] = G·Xu[:r]ᵀ, and gXu[:r] = Xd[o0 : o0 + m, :r]ᵀ·G, added to gXu unless first;
//   vector: gXd[o0 : o0 + m, 0] = Σ_cols G;
//   scalar: *total += Σ G.
// gXd has leading dimension R, gXu leading dimension cols. scratch: cols · rank elements.
template <class T>
void glora_factor_grad(const glora_choice& k, index o0, index m, index cols, index R, const T* xd, const T* xu,
                       const T* g, index ldg, bool first, T* gxd, T* gxu, T* total, T* scratch) {
  if (k.kind == glora_kind::lora) {
    const index r = k.rank;
    gemm<T>(false, true, m, r, cols, T(1), g, ldg, xu, cols, T(0), gxd + o0 * R, R);
    // gXu[:r] is formed as its transpose (cols, r) = Gᵀ · Xd[o0 : o0 + m, :r]: a narrow product that reads
    // G once, in place (the direct form would copy all of G into the kernel's panels).
    gemm<T>(true, false, cols, r, m, T(1), g, ldg, xd + o0 * R, R, T(0), scratch, r);
    for (index j = 0; j < r; ++j) {
      T* row = gxu + j * cols;
      for (index i = 0; i < cols; ++i) row[i] = first ? scratch[i * r + j] : row[i] + scratch[i * r + j];
    }
  } else if (k.kind == glora_kind::vector) {
    for (index o = 0; o < m; ++o) gxd[(o0 + o) * R] = vector_sum(g + o * ldg, cols);
  } else if (k.kind == glora_kind::scalar) {
    T s = T(0);
    for (index o = 0; o < m; ++o) s += vector_sum(g + o * ldg, cols);
    *total += s;
  }
}

template <class T>
void zero_store(glora<T>& g) {
  for_each_parameter(g, [](const char*, auto& p) { p.setZero(); });
}

// The backward work on W0 in one pass over row blocks (grad zero on entry):
//   gw (O, I), if not null: B's gradient from gW, then gW ← W0 ⊙ gW and A's gradient from it;
//   gb (O), if not null and C is not none: C's gradient from W0ᵀ · gb, formed in col (I elements).
// Each thread sums its blocks' shares of gAu, gBu, the scalar totals and W0ᵀ · gb into its own slice
// of ws.partials; the slices are then added in thread order.
template <class T>
void glora_backward_rows(const glora<T>& a, const glora_config& c, const glora_dims& d, const T* w0, T* gw,
                         const T* gb, T* col, glora_workspace<T>& ws, glora<T>& grad) {
  const index O = d.out, I = d.in, R = d.rank;
  const bool prompt = gb != nullptr && c.C.kind != glora_kind::none;
  if (gw == nullptr && !prompt) return;
  // Blocks of 512 KiB of each operand: gW's and W0's blocks then stay in L2 together through the five
  // passes over them (with 2 MiB blocks the pass took 0.133× a 512×768·768×768 product, with these 0.124×).
  const glora_plan plan = glora_blocks<T>(d, 524288);
  const index step = plan.step, blocks = plan.blocks;
  const int threads = plan.threads;
  // Per thread: gAu (R, I), gBu (R, I), W0ᵀ · gb (I), two totals, scratch for glora_factor_grad (R · I).
  const index scratch_at = 2 * R * I + I + 2, stride = scratch_at + R * I;
  glora_grow(ws.partials, threads * stride);
  const int team = glora_parallel_blocks(blocks, threads, [&](int t, index b0, index b1) {
    T* au = ws.partials.data() + t * stride;
    T* bu = au + R * I;
    T* pcol = bu + R * I;
    T* totals = pcol + I;
    T* scratch = au + scratch_at;
    totals[0] = totals[1] = T(0);
    for (index b = b0; b < b1; ++b) {
      const index o0 = b * step, o1 = std::min(O, o0 + step), m = o1 - o0;
      const bool first = b == b0;
      const T* w0b = w0 + o0 * I;
      if (gw != nullptr) {
        T* g = gw + o0 * I;
        glora_factor_grad(c.B, o0, m, I, R, a.Bd.data(), a.Bu.data(), g, I, first, grad.Bd.data(), bu, totals + 1,
                          scratch);
        if (c.A.kind != glora_kind::none) {
          for (index k = 0; k < m * I; ++k) g[k] *= w0b[k];
          glora_factor_grad(c.A, o0, m, I, R, a.Ad.data(), a.Au.data(), g, I, first, grad.Ad.data(), au, totals,
                            scratch);
        }
      }
      // pcol (1, I) (+)= gb[o0 : o1]ᵀ · W0 block, as its transpose (I, 1): a narrow product reading W0 in place.
      if (prompt) gemm<T>(true, false, I, 1, m, T(1), w0b, I, gb + o0, 1, first ? T(0) : T(1), pcol, 1);
    }
  });
  bool first = true;
  for (int t = 0; t < team; ++t) {
    if (blocks * t / team == blocks * (t + 1) / team) continue;  // this thread had no block
    const T* au = ws.partials.data() + t * stride;
    const T* bu = au + R * I;
    const T* pcol = bu + R * I;
    const T* totals = pcol + I;
    if (gw != nullptr) {
      if (c.B.kind == glora_kind::lora)
        for (index k = 0; k < c.B.rank * I; ++k) grad.Bu.data()[k] += bu[k];
      if (c.B.kind == glora_kind::scalar) grad.Bd.data()[0] += totals[1];
      if (c.A.kind == glora_kind::lora)
        for (index k = 0; k < c.A.rank * I; ++k) grad.Au.data()[k] += au[k];
      if (c.A.kind == glora_kind::scalar) grad.Ad.data()[0] += totals[0];
    }
    if (prompt) {
      for (index i = 0; i < I; ++i) col[i] = first ? pcol[i] : col[i] + pcol[i];
    }
    first = false;
  }
  if (prompt) {
    T total = T(0);
    glora_factor_grad(c.C, 0, I, 1, R, a.Cd.data(), a.Cu.data(), col, 1, true, grad.Cd.data(), grad.Cu.data(), &total,
                      ws.partials.data() + scratch_at);  // thread 0's scratch
  }
}

// The D and E parts of the store gradient from gb (O).
template <class T>
void glora_bias_grad(const glora_config& c, const glora_dims& d, const T* b0, const T* gb, glora<T>& grad) {
  const index O = d.out;
  if (c.E.kind == glora_kind::vector) {
    std::copy(gb, gb + O, grad.E.data());
  } else if (c.E.kind == glora_kind::scalar) {
    T s = T(0);
    for (index o = 0; o < O; ++o) s += gb[o];
    grad.E.data()[0] = s;
  }
  if (b0 != nullptr) {
    if (c.D.kind == glora_kind::vector) {
      for (index o = 0; o < O; ++o) grad.D.data()[o] = b0[o] * gb[o];
    } else if (c.D.kind == glora_kind::scalar) {
      T s = T(0);
      for (index o = 0; o < O; ++o) s += b0[o] * gb[o];
      grad.D.data()[0] = s;
    }
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// Weight space (weights of rank 2..5, viewed as (O, F) with F = I)

// dw (O, I1, …, Ik) = W0 ⊙ A + B, so that W_eff = W0 + dw.  w0: (O, I1, …, Ik), the same shape.
// Throws argument_error, before writing anything, on an illegal configuration (rank above R, scalar C,
// …), an inconsistent store, or a weight whose (O, F) is not the store's (O, I).
template <class T, int N>
void delta_weight(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                  nondeduced<tensor_view<T, N>> dw) {
  static_assert(N >= 2 && N <= 5, "GLoRA weights have rank 2 to 5");
  const char* fn = "glora delta_weight";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  TA_CHECK(dw.dimensions() == w0.dimensions(), fn,
           "dw has shape " + detail::shape_string(dw) + " but w0 " + detail::shape_string(w0));
  detail::glora_layer(a, c, d, w0.data(), static_cast<const T*>(nullptr), false, static_cast<T*>(nullptr), dw.data(),
                      static_cast<T*>(nullptr));
}

template <class T, int N>
tensor<T, N> delta_weight(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0) {
  tensor<T, N> dw(w0.dimensions());
  delta_weight<T, N>(a, c, view(w0), writable_view(dw));
  return dw;
}

// db (O) = b0 ⊙ D + E + W0 · C  (without a bias: E + W0 · C), so that b_eff = b0 + db.
//   w0: (O, I1, …, Ik) viewed as (O, F); b0: (O); db: (O).
// Throws argument_error, before writing anything, if a shape or the configuration does not fit.
template <class T, int N>
void delta_bias(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                nondeduced<const_tensor_view<T, 1>> b0, nondeduced<tensor_view<T, 1>> db,
                glora_workspace<T>& ws) {
  const char* fn = "glora delta_bias";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  detail::check_glora_vector(b0, d.out, fn, "b0");
  detail::check_glora_vector(db, d.out, fn, "db");
  detail::glora_grow(ws.col, d.in);
  detail::glora_layer(a, c, d, w0.data(), b0.data(), false, ws.col.data(), static_cast<T*>(nullptr), db.data());
}
template <class T, int N>
void delta_bias(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                nondeduced<tensor_view<T, 1>> db, glora_workspace<T>& ws) {
  const char* fn = "glora delta_bias";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  detail::check_glora_vector(db, d.out, fn, "db");
  detail::glora_grow(ws.col, d.in);
  detail::glora_layer(a, c, d, w0.data(), static_cast<const T*>(nullptr), false, ws.col.data(), static_cast<T*>(nullptr),
                      db.data());
}
template <class T, int N>
tensor<T, 1> delta_bias(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, 1>& b0) {
  tensor<T, 1> db(w0.dimension(0));
  glora_workspace<T> ws;
  delta_bias<T, N>(a, c, view(w0), view(b0), writable_view(db), ws);
  return db;
}
template <class T, int N>
tensor<T, 1> delta_bias(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0) {
  tensor<T, 1> db(w0.dimension(0));
  glora_workspace<T> ws;
  delta_bias<T, N>(a, c, view(w0), writable_view(db), ws);
  return db;
}

// Given gW = ∂L/∂W_eff (O, I1, …, Ik), viewed as (O, F): the A and B parts of the store gradient.
// A sees W0 ⊙ gW and B sees gW, each reduced to its kind (lora: gXd[:, :r] = G·Xu[:r]ᵀ,
// gXu[:r] = Xd[:, :r]ᵀ·G; vector: gXd[:, 0] = row sums of G; scalar: gXd[0, 0] = ΣG). Every other entry of
// grad (C, D, E included) is set to zero. grad is resized to the store's shapes if needed; it must not
// be the store itself. Throws argument_error, before writing anything, if a shape or the configuration
// does not fit.
template <class T, int N>
void delta_weight_vjp(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                      nondeduced<const_tensor_view<T, N>> gw, glora<T>& grad, glora_workspace<T>& ws) {
  const char* fn = "glora delta_weight_vjp";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  TA_CHECK(gw.dimensions() == w0.dimensions(), fn,
           "gW has shape " + detail::shape_string(gw) + " but w0 " + detail::shape_string(w0));
  detail::ensure_store_shape(a, grad);
  detail::zero_store(grad);
  detail::glora_grow(ws.gw, d.out * d.in);
  std::copy(gw.data(), gw.data() + d.out * d.in, ws.gw.data());
  detail::glora_backward_rows(a, c, d, w0.data(), ws.gw.data(), static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
                              ws, grad);
}
template <class T, int N>
glora<T> delta_weight_vjp(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, N>& gw) {
  glora<T> grad;
  glora_workspace<T> ws;
  delta_weight_vjp<T, N>(a, c, view(w0), view(gw), grad, ws);
  return grad;
}

// Given gb = ∂L/∂b_eff (O): the C, D and E parts of the store gradient. C sees W0ᵀ · gb (F), D sees b0 ⊙ gb
// (zero without a bias), E sees gb, each reduced to its kind. Every other entry of grad (A, B included)
// is set to zero; adding delta_weight_vjp's result gives the whole store gradient.
// Throws argument_error, before writing anything, if a shape or the configuration does not fit.
template <class T, int N>
void delta_bias_vjp(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                    nondeduced<const_tensor_view<T, 1>> b0, nondeduced<const_tensor_view<T, 1>> gb, glora<T>& grad,
                    glora_workspace<T>& ws) {
  const char* fn = "glora delta_bias_vjp";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  detail::check_glora_vector(b0, d.out, fn, "b0");
  detail::check_glora_vector(gb, d.out, fn, "gb");
  detail::ensure_store_shape(a, grad);
  detail::zero_store(grad);
  detail::glora_grow(ws.col, d.in);
  detail::glora_bias_grad(c, d, b0.data(), gb.data(), grad);
  detail::glora_backward_rows(a, c, d, w0.data(), static_cast<T*>(nullptr), gb.data(), ws.col.data(), ws, grad);
}
template <class T, int N>
void delta_bias_vjp(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                    nondeduced<const_tensor_view<T, 1>> gb, glora<T>& grad, glora_workspace<T>& ws) {
  const char* fn = "glora delta_bias_vjp";
  const detail::glora_dims d = detail::check_glora_store(a, fn);
  detail::check_glora_config(c, d.rank, fn);
  detail::check_glora_weight(d, w0, fn, "w0");
  detail::check_glora_vector(gb, d.out, fn, "gb");
  detail::ensure_store_shape(a, grad);
  detail::zero_store(grad);
  detail::glora_grow(ws.col, d.in);
  detail::glora_bias_grad(c, d, static_cast<const T*>(nullptr), gb.data(), grad);
  detail::glora_backward_rows(a, c, d, w0.data(), static_cast<T*>(nullptr), gb.data(), ws.col.data(), ws, grad);
}
template <class T, int N>
glora<T> delta_bias_vjp(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, 1>& b0,
                        const tensor<T, 1>& gb) {
  glora<T> grad;
  glora_workspace<T> ws;
  delta_bias_vjp<T, N>(a, c, view(w0), view(b0), view(gb), grad, ws);
  return grad;
}
template <class T, int N>
glora<T> delta_bias_vjp(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, 1>& gb) {
  glora<T> grad;
  glora_workspace<T> ws;
  delta_bias_vjp<T, N>(a, c, view(w0), view(gb), grad, ws);
  return grad;
}

// The merged layer for inference.
template <class T, int N>
struct glora_merged {
  tensor<T, N> weight;  // W_eff, the shape of W0
  tensor<T, 1> bias;    // b_eff (O)
};

// w_eff = W0 + W0 ⊙ A + B,  b_eff = b0 + b0 ⊙ D + E + W0 · C (without a bias: E + W0 · C), both from the
// original W0 and b0, also in place: w_eff and b_eff may be w0 and b0 themselves (the prompt term is
// formed before the weight is overwritten).  w0, w_eff: (O, I1, …, Ik); b0, b_eff: (O).
// Values beyond T's range come out as ±Inf (NaN where infinities of both signs meet); safe_merge rejects
// them instead. Throws argument_error, before writing anything, if a shape or the configuration does not fit.
template <class T, int N>
void merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
           nondeduced<const_tensor_view<T, 1>> b0, nondeduced<tensor_view<T, N>> w_eff,
           nondeduced<tensor_view<T, 1>> b_eff, glora_workspace<T>& ws) {
  const char* fn = "glora merge";
  detail::check_glora_vector(b0, detail::check_glora_store(a, fn).out, fn, "b0");
  const detail::glora_dims d = detail::check_glora_merge(a, c, w0, w_eff, b_eff, fn);
  detail::glora_grow(ws.col, d.in);
  detail::glora_layer(a, c, d, w0.data(), b0.data(), true, ws.col.data(), w_eff.data(), b_eff.data());
}
template <class T, int N>
void merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
           nondeduced<tensor_view<T, N>> w_eff, nondeduced<tensor_view<T, 1>> b_eff, glora_workspace<T>& ws) {
  const detail::glora_dims d = detail::check_glora_merge(a, c, w0, w_eff, b_eff, "glora merge");
  detail::glora_grow(ws.col, d.in);
  detail::glora_layer(a, c, d, w0.data(), static_cast<const T*>(nullptr), true, ws.col.data(), w_eff.data(),
                      b_eff.data());
}
template <class T, int N>
glora_merged<T, N> merge(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, 1>& b0) {
  glora_merged<T, N> m{tensor<T, N>(w0.dimensions()), tensor<T, 1>(w0.dimension(0))};
  glora_workspace<T> ws;
  merge<T, N>(a, c, view(w0), view(b0), writable_view(m.weight), writable_view(m.bias), ws);
  return m;
}
template <class T, int N>
glora_merged<T, N> merge(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0) {
  glora_merged<T, N> m{tensor<T, N>(w0.dimensions()), tensor<T, 1>(w0.dimension(0))};
  glora_workspace<T> ws;
  merge<T, N>(a, c, view(w0), writable_view(m.weight), writable_view(m.bias), ws);
  return m;
}

namespace detail {

// merge into ws.weight and ws.bias, then, if every value is finite, into w_eff and b_eff.
template <class T, int N>
void glora_safe_merge(const glora<T>& a, const glora_config& c, const const_tensor_view<T, N>& w0, const T* b0,
                      tensor_view<T, N> w_eff, tensor_view<T, 1> b_eff, glora_workspace<T>& ws) {
  const char* fn = "glora safe_merge";
  const glora_dims d = check_glora_merge(a, c, w0, w_eff, b_eff, fn);
  glora_grow(ws.col, d.in);
  glora_grow(ws.weight, d.out * d.in);
  glora_grow(ws.bias, d.out);
  glora_layer(a, c, d, w0.data(), b0, true, ws.col.data(), ws.weight.data(), ws.bias.data());
  TA_CHECK(all_finite(ws.weight.data(), d.out * d.in) && all_finite(ws.bias.data(), d.out), fn,
           "the merged weight " + shape_string(w0) + " or bias (" + std::to_string(d.out) +
               ") would hold a non-finite value; nothing was written");
  std::copy(ws.weight.data(), ws.weight.data() + d.out * d.in, w_eff.data());
  std::copy(ws.bias.data(), ws.bias.data() + d.out, b_eff.data());
}

}  // namespace detail

// As merge, but the layer is formed in the workspace first: only if every value of W_eff and b_eff is
// finite is it written to w_eff and b_eff. Otherwise (a NaN or Inf in the store, W0 or b0, or a value
// beyond T's range) throws argument_error and w_eff, b_eff are bit-identical to before. w_eff and b_eff
// may be w0 and b0 themselves. Throws argument_error, before writing anything, if a shape or the
// configuration does not fit.
template <class T, int N>
void safe_merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                nondeduced<const_tensor_view<T, 1>> b0, nondeduced<tensor_view<T, N>> w_eff,
                nondeduced<tensor_view<T, 1>> b_eff, glora_workspace<T>& ws) {
  detail::check_glora_vector(b0, detail::check_glora_store(a, "glora safe_merge").out, "glora safe_merge", "b0");
  detail::glora_safe_merge<T, N>(a, c, w0, b0.data(), w_eff, b_eff, ws);
}
template <class T, int N>
void safe_merge(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, N>> w0,
                nondeduced<tensor_view<T, N>> w_eff, nondeduced<tensor_view<T, 1>> b_eff, glora_workspace<T>& ws) {
  detail::glora_safe_merge<T, N>(a, c, w0, static_cast<const T*>(nullptr), w_eff, b_eff, ws);
}
template <class T, int N>
glora_merged<T, N> safe_merge(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0, const tensor<T, 1>& b0) {
  glora_merged<T, N> m{tensor<T, N>(w0.dimensions()), tensor<T, 1>(w0.dimension(0))};
  glora_workspace<T> ws;
  safe_merge<T, N>(a, c, view(w0), view(b0), writable_view(m.weight), writable_view(m.bias), ws);
  return m;
}
template <class T, int N>
glora_merged<T, N> safe_merge(const glora<T>& a, const glora_config& c, const tensor<T, N>& w0) {
  glora_merged<T, N> m{tensor<T, N>(w0.dimensions()), tensor<T, 1>(w0.dimension(0))};
  glora_workspace<T> ws;
  safe_merge<T, N>(a, c, view(w0), writable_view(m.weight), writable_view(m.bias), ws);
  return m;
}

// ---------------------------------------------------------------------------------------------------
// Linear layers

namespace detail {

template <class T>
glora_dims check_glora_linear(const glora<T>& a, const glora_config& c, const const_tensor_view<T, 2>& x,
                              const const_tensor_view<T, 2>& w0, const char* function) {
  const glora_dims d = check_glora_store(a, function);
  check_glora_config(c, d.rank, function);
  check_glora_weight(d, w0, function, "w0");
  TA_CHECK(x.dimension(0) >= 0 && x.dimension(1) == d.in, function,
           "x has shape " + shape_string(x) + " but w0 " + shape_string(w0) + " needs (n, " + std::to_string(d.in) + ")");
  return d;
}

// Linear layers take one of two paths (both give x · W_effᵀ + b_eff, up to rounding):
//   A is lora:  the batch goes through one GEMM against W_eff = W0 + W0 ⊙ A + B, formed on the GEMM's
//               packed panels of W0 (glora_gemm: O·I work in cache, none in memory);
//   otherwise:  A = a·1ᵀ is constant along the input dimension, so x · (W0 ⊙ A)ᵀ = (x · W0ᵀ) ⊙ aᵀ and B
//               acts in activation space (lora: (x · Bu[:r]ᵀ) · Bd[:, :r]ᵀ; vector and scalar: the row
//               sums of x times Bd[:, 0] or Bd[0, 0]).
// The vector (1 + a) per output (O): A's column, or its scalar, or zero.
template <class T>
T glora_a_factor(const glora<T>& a, const glora_config& c, index o, index R) {
  if (c.A.kind == glora_kind::vector) return a.Ad.data()[o * R];
  if (c.A.kind == glora_kind::scalar) return a.Ad.data()[0];
  return T(0);
}

// Records that ws.z holds x · W0ᵀ for this x (already copied into ws.z_x) and w0 (its address), O = W0's
// rows.
template <class T>
void glora_keep_z(const const_tensor_view<T, 2>& x, const T* w0, index O, glora_workspace<T>& ws) {
  ws.z_w0 = w0, ws.z_rows = x.dimension(0), ws.z_in = x.dimension(1), ws.z_out = O;
}

template <class T>
bool glora_z_kept(const const_tensor_view<T, 2>& x, const T* w0, index O, const glora_workspace<T>& ws) {
  return ws.z_w0 == w0 && ws.z_rows == x.dimension(0) && ws.z_in == x.dimension(1) && ws.z_out == O &&
         (x.size() == 0 || std::memcmp(ws.z_x.data(), x.data(), static_cast<std::size_t>(x.size()) * sizeof(T)) == 0);
}

// gb (O) = Σ_rows dy, split by columns over the threads.
template <class T>
void glora_column_sums(const const_tensor_view<T, 2>& dy, T* gb) {
  const index n = dy.dimension(0), O = dy.dimension(1);
  glora_parallel_for(O, n * O, [&](index o0, index o1) {
    std::fill(gb + o0, gb + o1, T(0));
    for (index i = 0; i < n; ++i) {
      const T* row = dy.data() + i * O;
      for (index o = o0; o < o1; ++o) gb[o] += row[o];
    }
  });
}

// sx (n) = Σ_cols x
template <class T>
void glora_row_sums(const const_tensor_view<T, 2>& x, T* sx) {
  const index n = x.dimension(0), I = x.dimension(1);
  glora_parallel_for(n, n * I, [&](index i0, index i1) {
    for (index i = i0; i < i1; ++i) sx[i] = vector_sum(x.data() + i * I, I);
  });
}

template <class T>
void glora_linear_forward(const glora<T>& a, const glora_config& c, const glora_dims& d,
                          const const_tensor_view<T, 2>& x, const T* w0, const T* b0, T* y, glora_workspace<T>& ws) {
  const index n = x.dimension(0), O = d.out, I = d.in, R = d.rank;
  glora_grow(ws.bias, O);
  glora_grow(ws.col, I);
  if (c.A.kind == glora_kind::lora) {
    glora_layer(a, c, d, w0, b0, true, ws.col.data(), static_cast<T*>(nullptr), ws.bias.data());
    glora_gemm<T> g = glora_panel_factors(a, c, d, true, ws.factors);
    g.bias = ws.bias.data(), g.y = y, g.ldy = O;  // y = x · W_effᵀ + b_eff, b_eff added tile by tile
    gemm<T>(false, true, n, O, I, T(1), x.data(), I, w0, I, T(0), y, O,
            {glora_edit_panels<T>, glora_finish_tile<T>, &g});
    return;
  }
  glora_layer(a, c, d, w0, b0, true, ws.col.data(), static_cast<T*>(nullptr), ws.bias.data());
  // y[i, o] = (z[i, o] + z[i, o]·a[o]) + b_eff[o] + sx[i]·bv[o] with z = x · W0ᵀ, tile by tile as the GEMM
  // finishes z (glora_finish_tile), where bv is B's column (vector) or value (scalar) and sx[i] = Σ_cols
  // x[i, :]. z stays in the workspace for the backward when A reads it (vector or scalar) and the
  // workspace has served a backward, and x is copied beside it in the pass that sums x's rows.
  const bool b_sums = c.B.kind == glora_kind::vector || c.B.kind == glora_kind::scalar;
  const bool keep = c.A.kind != glora_kind::none && ws.keep_z;
  glora_grow(ws.dh, 2 * O);
  glora_grow(ws.h, n);
  if (keep) glora_grow(ws.z, n * O), glora_grow(ws.z_x, n * I);
  glora_gemm<T> g;
  T* av = ws.dh.data();
  T* bv = av + O;
  for (index o = 0; o < O; ++o) {
    av[o] = glora_a_factor(a, c, o, R);
    bv[o] = c.B.kind == glora_kind::vector ? a.Bd.data()[o * R] : c.B.kind == glora_kind::scalar ? a.Bd.data()[0] : T(0);
  }
  T* sx = ws.h.data();
  if (keep || b_sums)
    glora_parallel_for(n, n * I, [&](index i0, index i1) {
      for (index i = i0; i < i1; ++i) {
        const T* xr = x.data() + i * I;
        if (keep) std::copy(xr, xr + I, ws.z_x.data() + i * I);
        if (b_sums) sx[i] = vector_sum(xr, I);
      }
    });
  g.av = av, g.bias = ws.bias.data(), g.sx = b_sums ? sx : nullptr, g.bv = bv, g.y = y, g.ldy = O;
  // z goes to the workspace when it is kept; otherwise y is the product's C and each tile becomes y in place.
  T* z = keep ? ws.z.data() : y;
  gemm<T>(false, true, n, O, I, T(1), x.data(), I, w0, I, T(0), z, O, {nullptr, glora_finish_tile<T>, &g});
  if (keep)
    glora_keep_z(x, w0, O, ws);
  else
    ws.z_w0 = nullptr;  // ws.z no longer matches what it was kept for
  if (c.B.kind == glora_kind::lora) {
    const index r = c.B.rank;
    glora_grow(ws.h, n * r);
    gemm<T>(false, true, n, r, I, T(1), x.data(), I, a.Bu.data(), I, T(0), ws.h.data(), r);
    gemm<T>(false, true, n, O, r, T(1), ws.h.data(), r, a.Bd.data(), R, T(1), y, O);
  }
}

template <class T>
void glora_linear_backward(const glora<T>& a, const glora_config& c, const glora_dims& d,
                           const const_tensor_view<T, 2>& x, const T* w0, const T* b0,
                           const const_tensor_view<T, 2>& dy, T* dx, glora<T>& grad, glora_workspace<T>& ws) {
  const index n = x.dimension(0), O = d.out, I = d.in, R = d.rank;
  ensure_store_shape(a, grad);
  zero_store(grad);
  glora_grow(ws.bias, O);
  glora_grow(ws.col, I);
  T* gb = ws.bias.data();
  glora_column_sums(dy, gb);
  glora_bias_grad(c, d, b0, gb, grad);

  if (c.A.kind == glora_kind::lora) {
    // A needs W0 ⊙ gW, which has no low-rank structure: form gW = dyᵀ · x once, then one pass over W0 for
    // A's and B's gradients and C's from W0ᵀ · gb. dx = dy · W_eff, W_eff formed on the product's panels,
    // last: x is read only for gW (dx may be x).
    glora_grow(ws.gw, O * I);
    gemm<T>(true, false, O, I, n, T(1), dy.data(), O, x.data(), I, T(0), ws.gw.data(), I);
    glora_backward_rows(a, c, d, w0, ws.gw.data(), gb, ws.col.data(), ws, grad);
    const glora_gemm<T> g = glora_panel_factors(a, c, d, false, ws.factors);
    gemm<T>(false, false, n, I, O, T(1), dy.data(), O, w0, I, T(0), dx, I, {glora_edit_panels<T>, nullptr, &g});
    return;
  }

  // C's gradient from W0ᵀ · gb.
  glora_backward_rows(a, c, d, w0, static_cast<T*>(nullptr), gb, ws.col.data(), ws, grad);

  // A (vector or scalar) sees W0 ⊙ gW reduced over the input dimension: Σ_i W0[o, i]·gW[o, i] =
  // Σ_rows dy ⊙ (x · W0ᵀ). dx = (dy ⊙ (1 + a)ᵀ) · W0 + the B term.
  const T* dyw = dy.data();  // dy ⊙ (1 + a)ᵀ
  if (c.A.kind != glora_kind::none) {
    if (!glora_z_kept(x, w0, O, ws)) {  // not left by this step's forward (glora_workspace)
      glora_grow(ws.z, n * O);
      gemm<T>(false, true, n, O, I, T(1), x.data(), I, w0, I, T(0), ws.z.data(), O);
      glora_grow(ws.z_x, x.size());
      std::copy(x.data(), x.data() + x.size(), ws.z_x.data());
      glora_keep_z(x, w0, O, ws);
      ws.keep_z = true;  // from now on the forward keeps it
    }
    glora_grow(ws.gw, n * O);
    glora_grow(ws.dh, 2 * O);
    const T* z = ws.z.data();
    T* dys = ws.gw.data();
    T* av = ws.dh.data();
    T* acc = av + O;  // Σ_rows dy ⊙ z
    for (index o = 0; o < O; ++o) av[o] = glora_a_factor(a, c, o, R), acc[o] = T(0);
    glora_parallel_for(O, n * O, [&](index o0, index o1) {
      for (index i = 0; i < n; ++i) {
        const T* zr = z + i * O;
        const T* dr = dy.data() + i * O;
        T* sr = dys + i * O;
        for (index o = o0; o < o1; ++o) {
          acc[o] += dr[o] * zr[o];
          sr[o] = dr[o] + dr[o] * av[o];
        }
      }
    });
    if (c.A.kind == glora_kind::vector) {
      for (index o = 0; o < O; ++o) grad.Ad.data()[o * R] = acc[o];
    } else {
      T total = T(0);
      for (index o = 0; o < O; ++o) total += acc[o];
      grad.Ad.data()[0] = total;
    }
    dyw = dys;
  }
  // B's gradients read x, so they are formed before dx is written (dx may be x); A's read x only through
  // z, above. Then dx = dyw · W0 and the B term from what B's gradients left in the workspace.
  if (c.B.kind == glora_kind::lora) {
    // h = x · Bu[:r]ᵀ, gBd[:, :r] = dyᵀ · h, dh = dy · Bd[:, :r], gBu[:r] = dhᵀ · x; below, dx += dh · Bu[:r].
    const index r = c.B.rank;
    glora_grow(ws.h, n * r);
    glora_grow(ws.dh, n * r);
    gemm<T>(false, true, n, r, I, T(1), x.data(), I, a.Bu.data(), I, T(0), ws.h.data(), r);
    gemm<T>(true, false, O, r, n, T(1), dy.data(), O, ws.h.data(), r, T(0), grad.Bd.data(), R);
    gemm<T>(false, false, n, r, O, T(1), dy.data(), O, a.Bd.data(), R, T(0), ws.dh.data(), r);
    gemm<T>(true, false, r, I, n, T(1), ws.dh.data(), r, x.data(), I, T(0), grad.Bu.data(), I);
  } else if (c.B.kind != glora_kind::none) {
    // gW's row sums are dyᵀ · sx with sx = Σ_cols x (the total: Σ_rows (Σ_o dy)·sx); below, dx gains, in
    // every column of row i, u[i] = Σ_o dy[i, o]·Bd[o, 0] (vector) or Bd[0, 0]·Σ_o dy[i, o] (scalar).
    glora_grow(ws.h, 2 * n);
    glora_grow(ws.dh, 2 * O);
    T* sx = ws.h.data();
    T* u = sx + n;
    glora_row_sums(x, sx);
    if (c.B.kind == glora_kind::vector) {
      T* bv = ws.dh.data();
      T* acc = bv + O;
      for (index o = 0; o < O; ++o) bv[o] = a.Bd.data()[o * R];
      gemm<T>(false, false, 1, O, n, T(1), sx, n, dy.data(), O, T(0), acc, O);  // sxᵀ · dy
      gemm<T>(false, false, n, 1, O, T(1), dy.data(), O, bv, 1, T(0), u, 1);    // dy · bv
      for (index o = 0; o < O; ++o) grad.Bd.data()[o * R] = acc[o];
    } else {
      // Scalar: with t[i] = Σ_o dy[i, o], the total is Σ_i t[i]·sx[i] and u[i] = Bd[0, 0]·t[i].
      glora_row_sums(dy, u);
      T total = T(0);
      for (index i = 0; i < n; ++i) total += u[i] * sx[i], u[i] *= a.Bd.data()[0];
      grad.Bd.data()[0] = total;
    }
  }

  gemm<T>(false, false, n, I, O, T(1), dyw, O, w0, I, T(0), dx, I);
  if (c.B.kind == glora_kind::lora) {
    gemm<T>(false, false, n, I, c.B.rank, T(1), ws.dh.data(), c.B.rank, a.Bu.data(), I, T(1), dx, I);
  } else if (c.B.kind != glora_kind::none) {
    const T* u = ws.h.data() + n;  // dx[i, :] gains u[i]
    glora_parallel_for(n, n * I, [&](index i0, index i1) {
      for (index i = i0; i < i1; ++i) {
        T* xr = dx + i * I;
        const T ui = u[i];
        for (index k = 0; k < I; ++k) xr[k] += ui;
      }
    });
  }
}

}  // namespace detail

// y (n, O) = x · W_effᵀ + b_eff with W_eff = W0 + W0 ⊙ A + B and b_eff = b0 + b0 ⊙ D + E + W0 · C.
//   x: (n, I), w0: (O, I), b0: (O), y: (n, O).
// With A lora, the batch goes through one GEMM against W_eff, formed from W0 as the GEMM packs it (O·I
// work in cache, nothing written to memory); otherwise y = (x · W0ᵀ) ⊙ (1 + a)ᵀ + the B term in
// activation space + b_eff, x · W0ᵀ kept in the workspace for the backward once the workspace has
// served one (glora_workspace). y must not overlap x or w0. Throws argument_error, before writing
// anything, if a shape or the configuration does not fit. Makes no allocation on a warm workspace (see
// glora_workspace).
template <class T>
void forward(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, 2>> x,
             nondeduced<const_tensor_view<T, 2>> w0, nondeduced<const_tensor_view<T, 1>> b0,
             nondeduced<tensor_view<T, 2>> y, glora_workspace<T>& ws) {
  const char* fn = "glora forward";
  const detail::glora_dims d = detail::check_glora_linear(a, c, x, w0, fn);
  detail::check_glora_vector(b0, d.out, fn, "b0");
  detail::check_glora_matrix(y.dimensions(), x.dimension(0), d.out, fn, "y");
  detail::glora_linear_forward(a, c, d, x, w0.data(), b0.data(), y.data(), ws);
}

// The same without a bias: y = x · W_effᵀ + E + W0 · C (D is not read).
template <class T>
void forward(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, 2>> x,
             nondeduced<const_tensor_view<T, 2>> w0, nondeduced<tensor_view<T, 2>> y, glora_workspace<T>& ws) {
  const char* fn = "glora forward";
  const detail::glora_dims d = detail::check_glora_linear(a, c, x, w0, fn);
  detail::check_glora_matrix(y.dimensions(), x.dimension(0), d.out, fn, "y");
  detail::glora_linear_forward(a, c, d, x, w0.data(), static_cast<const T*>(nullptr), y.data(), ws);
}

// Value-returning forms.
template <class T>
tensor<T, 2> forward(const glora<T>& a, const glora_config& c, const tensor<T, 2>& x, const tensor<T, 2>& w0,
                     const tensor<T, 1>& b0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  glora_workspace<T> ws;
  forward(a, c, x, w0, b0, y, ws);
  return y;
}
template <class T>
tensor<T, 2> forward(const glora<T>& a, const glora_config& c, const tensor<T, 2>& x, const tensor<T, 2>& w0) {
  tensor<T, 2> y(x.dimension(0), w0.dimension(0));
  glora_workspace<T> ws;
  forward(a, c, x, w0, y, ws);
  return y;
}

// Backward of the linear forward with W0 and b0 frozen, given dy = ∂L/∂y (n, O):
//   gW = dyᵀ · x,  gb = Σ_rows dy,  dx = dy · W_eff;
//   A sees W0 ⊙ gW, B sees gW, C sees W0ᵀ · gb, D sees b0 ⊙ gb, E sees gb, each reduced to its kind.
// Every store entry the configuration does not read gets exactly zero. gW (O, I) is formed only when A
// is lora; with A vector or scalar its reduction Σ_i W0 ⊙ gW is Σ_rows dy ⊙ (x · W0ᵀ), where x · W0ᵀ is
// the forward's, kept in the workspace, while x and w0 are the same (glora_workspace), and B is handled
// in activation space. With A lora, dx = dy · W_eff goes through one GEMM that forms W_eff from W0 as it
// packs it.
//   x: (n, I), w0: (O, I), b0: (O), dy: (n, O), dx: (n, I); grad is resized to the store's shapes if
// needed and overwritten (it must not be the store itself); dx must not overlap dy or w0 (it may be x:
// every read of x comes before dx is written). Throws argument_error, before writing anything, if a
// shape or the configuration does not fit. Makes no allocation on a warm workspace (see glora_workspace)
// when grad has the store's shapes.
template <class T>
void backward(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, 2>> x,
              nondeduced<const_tensor_view<T, 2>> w0, nondeduced<const_tensor_view<T, 1>> b0,
              nondeduced<const_tensor_view<T, 2>> dy, nondeduced<tensor_view<T, 2>> dx, glora<T>& grad,
              glora_workspace<T>& ws) {
  const char* fn = "glora backward";
  const detail::glora_dims d = detail::check_glora_linear(a, c, x, w0, fn);
  detail::check_glora_vector(b0, d.out, fn, "b0");
  detail::check_glora_matrix(dy.dimensions(), x.dimension(0), d.out, fn, "dy");
  detail::check_glora_matrix(dx.dimensions(), x.dimension(0), d.in, fn, "dx");
  detail::glora_linear_backward(a, c, d, x, w0.data(), b0.data(), dy, dx.data(), grad, ws);
}

// The same without a bias (D gets zero gradient).
template <class T>
void backward(const glora<T>& a, const glora_config& c, nondeduced<const_tensor_view<T, 2>> x,
              nondeduced<const_tensor_view<T, 2>> w0, nondeduced<const_tensor_view<T, 2>> dy,
              nondeduced<tensor_view<T, 2>> dx, glora<T>& grad, glora_workspace<T>& ws) {
  const char* fn = "glora backward";
  const detail::glora_dims d = detail::check_glora_linear(a, c, x, w0, fn);
  detail::check_glora_matrix(dy.dimensions(), x.dimension(0), d.out, fn, "dy");
  detail::check_glora_matrix(dx.dimensions(), x.dimension(0), d.in, fn, "dx");
  detail::glora_linear_backward(a, c, d, x, w0.data(), static_cast<const T*>(nullptr), dy, dx.data(), grad, ws);
}

template <class T>
struct glora_gradients {
  tensor<T, 2> dx;  // (n, I)
  glora<T> grad;    // the store's shapes
};

// Value-returning forms.
template <class T>
glora_gradients<T> backward(const glora<T>& a, const glora_config& c, const tensor<T, 2>& x, const tensor<T, 2>& w0,
                            const tensor<T, 1>& b0, const tensor<T, 2>& dy) {
  glora_gradients<T> g;
  g.dx.resize(x.dimension(0), x.dimension(1));
  glora_workspace<T> ws;
  backward(a, c, x, w0, b0, dy, g.dx, g.grad, ws);
  return g;
}
template <class T>
glora_gradients<T> backward(const glora<T>& a, const glora_config& c, const tensor<T, 2>& x, const tensor<T, 2>& w0,
                            const tensor<T, 2>& dy) {
  glora_gradients<T> g;
  g.dx.resize(x.dimension(0), x.dimension(1));
  glora_workspace<T> ws;
  backward(a, c, x, w0, dy, g.dx, g.grad, ws);
  return g;
}

}  // namespace tensor_adapters
