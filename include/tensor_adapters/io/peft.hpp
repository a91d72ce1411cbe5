// PEFT LoRA adapters on disk (optional: needs nlohmann-json through io/safetensors.hpp).
//
// A PEFT LoRA adapter is a directory with two files:
//   adapter_model.safetensors  for each adapted module <m> (its name in the base model, e.g.
//                              "model.layers.0.self_attn.q_proj"):
//                                base_model.model.<m>.lora_A.weight  (r, in)  linear;  (r, in, kh, kw)  conv2d
//                                base_model.model.<m>.lora_B.weight  (out, r) linear;  (out, r, 1, 1)   conv2d
//                              (conv1d / conv3d: the same with one / three kernel extents).
//   adapter_config.json        "peft_type": "LORA", "r", "lora_alpha", "use_rslora", "target_modules",
//                              "rank_pattern", "alpha_pattern", and PEFT's other fields.
//
// A module's rank and alpha are r and lora_alpha unless a key of rank_pattern (resp. alpha_pattern)
// matches it. PEFT's rule, followed here: keys are tried in file order, and key k matches module name m
// when the regular expression (.*\.)?(k)$ matches m from its start — so "v_proj" matches
// "model.layers.0.self_attn.v_proj", and a full module name matches that module. The scale is
// alpha / r, or alpha / sqrt(r) with use_rslora. A module is targeted when target_modules (a list) holds
// its name or a suffix of it that starts after a '.', or when target_modules (a string) is a regular
// expression matching the whole name; PEFT's layers_to_transform / layers_pattern and exclude_modules
// narrow that as PEFT does (peft_targets).
//
// Patterns come from files, so they are bounded before std::regex compiles them (io::detail::check_pattern
// in io/detail/adapter_files.hpp; each limit is an io:: constant): at most 1,000 characters, groups nested
// at most 32 deep, repetition counts {n,m} of at most 6 digits, about 4,000 automaton states with every
// counted repetition expanded, at most 2 lookaheads (?= …) / (?! …) of about 64 states in all and none
// inside another, and no back-references. Module names matched against a pattern are at most 1,000
// characters, and the JSON text nests at most 64 deep. With libstdc++, matching runs its polynomial-time
// automaton simulation, not its backtracking matcher: a pattern such as (a*)*b costs time linear in the
// name. The slowest patterns found within the limits take 0.05-0.07 s on a 1,000-character name without
// lookaheads ((?:.*){799}) and 0.35-0.8 s with one (a lookahead holding twenty .*, tried at every
// position), on a shared 2-core machine; a lookahead such as ^(?!.*vision_tower) costs little. Each key is
// matched against each module, so a file's total is that times keys × modules. Other standard libraries
// backtrack: there the limits bound the recursion but not the time. A pattern or name beyond a limit
// raises format_error.
//
// Loading checks every key, shape and value before returning: each module has both factors, of rank 2
// to 5, agreeing on r; B's trailing extents are 1; r is the rank the config gives the module; the module
// is one target_modules selects; and the config does not ask for a variant this reader cannot represent
// (DoRA, fan_in_fan_out, trainable LoRA biases). Errors raise io::format_error naming the file, the
// module and the tensor; the tensor file's problems are collected over every module and reported
// together, one per line.
//
// Example:
//   auto adapter = tensor_adapters::io::load_peft_lora<float>("out/checkpoint-500");
//   for (auto& [module, layer] : adapter.layers) merge(layer.adapter, my_weights[module]);
#pragma once

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../lora.hpp"
#include "detail/adapter_files.hpp"
#include "safetensors.hpp"

namespace tensor_adapters::io {

struct peft_lora_config {
  index r = 8;
  double lora_alpha = 8.0;
  bool use_rslora = false;
  // Either a list of module names / name suffixes, or (when target_modules_regex is non-empty) a regular
  // expression the whole module name must match. "all-linear" selects every module.
  std::vector<std::string> target_modules;
  std::string target_modules_regex;
  // Per-module overrides, in file order: (pattern, rank) and (pattern, alpha).
  std::vector<std::pair<std::string, index>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  // PEFT's narrowing of a target_modules list (empty: none), see peft_targets: the layer indices a module
  // selected by a suffix must sit in, the names of the module lists holding them ("layers", "h", …), and
  // modules excluded by name or suffix, or (exclude_modules_regex non-empty) by a regular expression.
  std::vector<index> layers_to_transform;
  std::vector<std::string> layers_pattern;
  std::vector<std::string> exclude_modules;
  std::string exclude_modules_regex;
};

// One adapted module.
template <class T>
struct peft_lora_layer {
  lora<T> adapter;                  // A (r, F), B (O, r); scale from the config
  std::vector<index> weight_shape;  // the adapted weight: (O, I) linear; (O, in, kh, kw) conv2d
};

// A loaded adapter: the config and the layers by module name (without the "base_model.model." prefix).
template <class T>
struct peft_lora_adapter {
  peft_lora_config config;
  std::map<std::string, peft_lora_layer<T>> layers;
};

// The key prefix and suffixes PEFT uses in adapter_model.safetensors.
inline const std::string peft_prefix = "base_model.model.";
inline const std::string peft_a_suffix = ".lora_A.weight";
inline const std::string peft_b_suffix = ".lora_B.weight";

// PEFT's pattern rule: true if (.*\.)?(key)$ matches `module` from its start. Throws format_error if key
// is not a valid regular expression or exceeds the pattern limits, or if module is longer than
// max_module_name_length.
inline bool peft_pattern_matches(const std::string& key, const std::string& module) {
  return detail::pattern_matches(detail::compile_peft_key(key, "PEFT pattern"), module, "PEFT pattern");
}

// The rank PEFT gives `module`: the value of the first rank_pattern key that matches it, else r.
inline index peft_rank(const peft_lora_config& c, const std::string& module) {
  for (const auto& kv : c.rank_pattern)
    if (peft_pattern_matches(kv.first, module)) return kv.second;
  return c.r;
}

// The alpha PEFT gives `module`: the value of the first alpha_pattern key that matches it, else lora_alpha.
inline double peft_alpha(const peft_lora_config& c, const std::string& module) {
  for (const auto& kv : c.alpha_pattern)
    if (peft_pattern_matches(kv.first, module)) return kv.second;
  return c.lora_alpha;
}

// The scale of `module`'s adapter: alpha / r, or alpha / sqrt(r) with use_rslora.
inline double peft_scale(const peft_lora_config& c, const std::string& module) {
  return lora_scale(peft_alpha(c, module), peft_rank(c, module), c.use_rslora);
}

namespace detail {

// The list rule shared by target_modules and exclude_modules: the name itself or a suffix after a '.'.
inline bool listed(const std::vector<std::string>& list, const std::string& module) {
  for (const std::string& t : list)
    if (module == t || ends_with(module, "." + t)) return true;
  return false;
}

// PEFT's layer index of a module: the number after "<pattern>." and before the next '.', the last such
// place in the name (for each pattern in turn; any module list's name when there is none), or -1.
inline index peft_layer_index(const std::vector<std::string>& patterns, const std::string& module) {
  const std::vector<std::string> any{"[^.]*"};
  for (const std::string& p : patterns.empty() ? any : patterns) {
    std::smatch m;
    const std::regex re = compile_pattern(".*\\.(?:" + p + ")\\.([0-9]+)\\.", "PEFT layers_pattern");
    if (module.size() <= max_module_name_length && std::regex_search(module, m, re, std::regex_constants::match_continuous))
      return m[1].length() > 18 ? -1 : static_cast<index>(std::stoll(m[1].str()));
  }
  return -1;
}

}  // namespace detail

// True if the config selects `module`, by PEFT's rule: not if exclude_modules lists it (its name or a
// suffix after a '.') or, as a regular expression, matches its whole name; then if target_modules, as a
// regular expression, matches its whole name ("all-linear": every module), or as a list holds its name;
// or if the list holds a suffix of it after a '.' and, with layers_to_transform, the module's layer index
// (see detail::peft_layer_index) is one of them. A config without target_modules (null or absent in the
// file) selects every module not excluded.
inline bool peft_targets(const peft_lora_config& c, const std::string& module) {
  if (!c.exclude_modules_regex.empty()) {
    if (detail::pattern_matches(detail::compile_pattern(c.exclude_modules_regex, "PEFT exclude_modules"), module,
                                "PEFT exclude_modules"))
      return false;
  } else if (detail::listed(c.exclude_modules, module)) {
    return false;
  }
  if (c.target_modules.empty() && c.target_modules_regex.empty()) return true;
  if (!c.target_modules_regex.empty()) {
    if (c.target_modules_regex == "all-linear") return true;
    return detail::pattern_matches(detail::compile_pattern(c.target_modules_regex, "PEFT target_modules"), module,
                                   "PEFT target_modules");
  }
  if (std::find(c.target_modules.begin(), c.target_modules.end(), module) != c.target_modules.end()) return true;
  if (!detail::listed(c.target_modules, module)) return false;
  if (c.layers_to_transform.empty()) return true;
  const index layer = detail::peft_layer_index(c.layers_pattern, module);
  return std::find(c.layers_to_transform.begin(), c.layers_to_transform.end(), layer) != c.layers_to_transform.end();
}

// Parses adapter_config.json text. `name` names it in messages. Throws format_error on invalid JSON,
// duplicate keys, a missing or mistyped field, a peft_type other than LORA, or a variant this library does
// not represent (use_dora, fan_in_fan_out, lora_bias, a bias other than "none").
inline peft_lora_config parse_peft_lora_config(const std::string& text, const std::string& name) {
  const nlohmann::ordered_json j = detail::parse_json_strict(text.data(), text.size(), name);
  auto fail = [&](const std::string& message) -> void { throw format_error(name + ": " + message); };
  if (!j.is_object()) fail("the config is not a JSON object");
  peft_lora_config c;
  auto get = [&](const char* key) -> const nlohmann::ordered_json* {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  detail::check_peft_type(j, "LORA", false, name);
  const auto* r = get("r");
  if (!r || !r->is_number_unsigned() || r->get<std::uint64_t>() < 1 || r->get<std::uint64_t>() > (1u << 30))
    fail("\"r\" must be a positive integer");
  c.r = static_cast<index>(r->get<std::uint64_t>());
  const auto* alpha = get("lora_alpha");
  if (!alpha || !alpha->is_number() || !std::isfinite(alpha->get<double>()))
    fail("\"lora_alpha\" must be a finite number");
  c.lora_alpha = alpha->get<double>();
  if (auto* p = get("use_rslora")) {
    if (!p->is_boolean()) fail("\"use_rslora\" must be true or false");
    c.use_rslora = p->get<bool>();
  }
  for (const char* flag : {"use_dora", "fan_in_fan_out", "lora_bias"}) {
    if (auto* p = get(flag); p && !(p->is_boolean() && !p->get<bool>()))
      fail(std::string("\"") + flag + "\" is " + detail::json_excerpt(*p) + "; only plain LoRA (false) is supported");
  }
  if (auto* p = get("bias"); p && !(p->is_string() && p->get<std::string>() == "none"))
    fail("\"bias\" is " + detail::json_excerpt(*p) +
         "; only \"none\" is supported (the adapter must not train biases)");
  detail::parse_target_modules(j, name, c.target_modules, c.target_modules_regex);
  if (auto* p = get("layers_to_transform")) {  // an index or a list of them
    for (const auto& v : p->is_array() ? *p : nlohmann::ordered_json::array({*p})) {
      if (!v.is_number_unsigned() || v.get<std::uint64_t>() > (1u << 30))
        fail("\"layers_to_transform\" must be a layer index or a list of them");
      c.layers_to_transform.push_back(static_cast<index>(v.get<std::uint64_t>()));
    }
  }
  if (auto* p = get("layers_pattern")) {  // a module list's name or a list of them
    for (const auto& v : p->is_array() ? *p : nlohmann::ordered_json::array({*p})) {
      if (!v.is_string()) fail("\"layers_pattern\" must be a name or a list of names");
      detail::compile_pattern(v.get<std::string>(), name + " layers_pattern");
      c.layers_pattern.push_back(v.get<std::string>());
    }
  }
  if (auto* p = get("exclude_modules")) {
    if (p->is_string()) {
      c.exclude_modules_regex = p->get<std::string>();
      if (c.exclude_modules_regex.empty()) fail("\"exclude_modules\" is an empty string");
      detail::compile_pattern(c.exclude_modules_regex, name + " exclude_modules");
    } else if (p->is_array()) {
      for (const auto& v : *p) {
        if (!v.is_string()) fail("\"exclude_modules\" holds " + detail::json_excerpt(v) + ", not a string");
        c.exclude_modules.push_back(v.get<std::string>());
      }
    } else {
      fail("\"exclude_modules\" must be a list of names or a regular expression");
    }
  }
  if (auto* p = get("rank_pattern")) {
    if (!p->is_object()) fail("\"rank_pattern\" must be an object");
    for (auto it = p->begin(); it != p->end(); ++it) {
      if (!it.value().is_number_unsigned() || it.value().get<std::uint64_t>() < 1 ||
          it.value().get<std::uint64_t>() > (1u << 30))
        fail("rank_pattern[" + detail::quoted_excerpt(it.key()) + "] must be a positive integer");
      detail::compile_peft_key(it.key(), name + " rank_pattern");
      c.rank_pattern.emplace_back(it.key(), static_cast<index>(it.value().get<std::uint64_t>()));
    }
  }
  if (auto* p = get("alpha_pattern")) {
    if (!p->is_object()) fail("\"alpha_pattern\" must be an object");
    for (auto it = p->begin(); it != p->end(); ++it) {
      if (!it.value().is_number() || !std::isfinite(it.value().get<double>()))
        fail("alpha_pattern[" + detail::quoted_excerpt(it.key()) + "] must be a finite number");
      detail::compile_peft_key(it.key(), name + " alpha_pattern");
      c.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
    }
  }
  return c;
}

// Reads adapter_config.json at `path`.
inline peft_lora_config read_peft_lora_config(const std::string& path) {
  return parse_peft_lora_config(detail::read_text_file(path), path);
}

// The adapter_config.json text PEFT writes for this config (the fields PEFT's LoraConfig reads, with its
// defaults for training-only settings: lora_dropout 0, bias "none", inference_mode true). A pattern key
// listed twice is written once, with its first value, the one peft_rank and peft_alpha use. Throws
// format_error if a module name or pattern is not valid UTF-8.
inline std::string peft_lora_config_json(const peft_lora_config& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  nlohmann::ordered_json alpha = nlohmann::ordered_json::object();
  for (const auto& kv : c.alpha_pattern)
    if (!alpha.contains(kv.first)) detail::json_number(alpha, kv.first, kv.second);
  j["alpha_pattern"] = alpha;
  j["auto_mapping"] = nullptr;
  j["base_model_name_or_path"] = nullptr;
  j["bias"] = "none";
  // Written only when set: PEFT versions before exclude_modules existed do not know the key.
  if (!c.exclude_modules_regex.empty()) j["exclude_modules"] = c.exclude_modules_regex;
  else if (!c.exclude_modules.empty()) j["exclude_modules"] = c.exclude_modules;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  if (c.layers_pattern.empty()) j["layers_pattern"] = nullptr;
  else j["layers_pattern"] = c.layers_pattern;
  if (c.layers_to_transform.empty()) j["layers_to_transform"] = nullptr;
  else j["layers_to_transform"] = c.layers_to_transform;
  detail::json_number(j, "lora_alpha", c.lora_alpha);
  j["lora_dropout"] = 0.0;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = c.r;
  nlohmann::ordered_json rank = nlohmann::ordered_json::object();
  for (const auto& kv : c.rank_pattern)
    if (!rank.contains(kv.first)) rank[kv.first] = kv.second;
  j["rank_pattern"] = rank;
  j["revision"] = nullptr;
  detail::json_target_modules(j, c.target_modules, c.target_modules_regex);
  j["task_type"] = nullptr;
  j["use_rslora"] = c.use_rslora;
  return detail::config_text(j, "PEFT adapter config");
}

// Builds the adapter from a parsed config and adapter_model.safetensors. Throws format_error naming the
// file, the module and the tensor for an unexpected key, a missing factor, a shape that does not fit, or a
// rank the config does not give that module.
template <class T>
peft_lora_adapter<T> load_peft_lora(const peft_lora_config& config, const safetensors_file& file) {
  peft_lora_adapter<T> out;
  out.config = config;
  const std::string& fname = file.name();
  auto fail = [&](const std::string& message) -> void { throw format_error(fname + ": " + message); };
  detail::problem_list problems;  // every module is checked; all problems are reported together

  std::map<std::string, std::pair<const tensor_info*, const tensor_info*>> modules;  // module → (A, B)
  for (const tensor_info& t : file.tensors()) {
    problems.check([&] {
      const bool is_a = detail::ends_with(t.name, peft_a_suffix), is_b = detail::ends_with(t.name, peft_b_suffix);
      if (t.name.compare(0, peft_prefix.size(), peft_prefix) != 0 || (!is_a && !is_b) ||
          t.name.size() <= peft_prefix.size() + peft_a_suffix.size())
        fail("tensor \"" + t.name + "\" is not a PEFT LoRA factor (base_model.model.<module>.lora_A.weight or " +
             ".lora_B.weight); embedding LoRA, DoRA, LoRA biases and modules_to_save are not supported");
      const std::string module =
          t.name.substr(peft_prefix.size(), t.name.size() - peft_prefix.size() - peft_a_suffix.size());
      (is_a ? modules[module].first : modules[module].second) = &t;
    });
  }

  for (const auto& entry : modules) {
    const std::string& module = entry.first;
    const std::pair<const tensor_info*, const tensor_info*>& factors = entry.second;
    problems.check([&] {
      const std::string where = "module \"" + module + "\"";
      const std::string a_key = peft_prefix + module + peft_a_suffix, b_key = peft_prefix + module + peft_b_suffix;
      if (!factors.first) fail(where + " has " + b_key + " but no " + a_key);
      if (!factors.second) fail(where + " has " + a_key + " but no " + b_key);
      const tensor_info& a = *factors.first;
      const tensor_info& b = *factors.second;
      const std::size_t rank_a = a.shape.size();
      if (rank_a < 2 || rank_a > 5)
        fail(where + ": " + a_key + " has shape " + detail::shape_text(a.shape) + "; LoRA factors have rank 2 to 5");
      bool b_ok = b.shape.size() == rank_a;
      for (std::size_t d = 2; b_ok && d < rank_a; ++d) b_ok = b.shape[d] == 1;
      if (!b_ok)
        fail(where + ": " + b_key + " has shape " + detail::shape_text(b.shape) + " but " + a_key + " has shape " +
             detail::shape_text(a.shape) + "; B must be (out, r" + std::string(rank_a > 2 ? ", 1…" : "") + ")");
      const index r = a.shape[0];
      if (b.shape[1] != r)
        fail(where + ": " + a_key + " " + detail::shape_text(a.shape) + " and " + b_key + " " +
             detail::shape_text(b.shape) + " disagree on the rank");
      index fan_in = 1;
      for (std::size_t d = 1; d < rank_a; ++d) fan_in *= a.shape[d];
      if (r < 1 || fan_in < 1 || b.shape[0] < 1)
        fail(where + ": " + a_key + " " + detail::shape_text(a.shape) + " and " + b_key + " " +
             detail::shape_text(b.shape) + " must not be empty");
      if (r > std::min(b.shape[0], fan_in))
        fail(where + ": " + a_key + " " + detail::shape_text(a.shape) + " and " + b_key + " " +
             detail::shape_text(b.shape) + " have rank " + std::to_string(r) + ", above min(out, fan_in) = " +
             std::to_string(std::min(b.shape[0], fan_in)) + " (PEFT accepts it; ΔW cannot use the extra rank)");
      const index expected_rank = peft_rank(config, module);
      if (r != expected_rank)
        fail(where + " has rank " + std::to_string(r) + " in " + a_key + " but adapter_config.json gives it rank " +
             std::to_string(expected_rank) + " (r, or the first rank_pattern key that matches it)");
      if (!peft_targets(config, module))
        fail(where + " has LoRA factors but adapter_config.json's target_modules does not select it");

      peft_lora_layer<T> layer;
      layer.weight_shape.push_back(b.shape[0]);
      layer.weight_shape.insert(layer.weight_shape.end(), a.shape.begin() + 1, a.shape.end());
      layer.adapter.A.resize(r, fan_in);
      layer.adapter.B.resize(b.shape[0], r);
      const std::vector<T> av = file.template load_values<T>(a.name), bv = file.template load_values<T>(b.name);
      std::copy(av.begin(), av.end(), layer.adapter.A.data());
      std::copy(bv.begin(), bv.end(), layer.adapter.B.data());
      layer.adapter.scale = static_cast<T>(peft_scale(config, module));
      out.layers.emplace(module, std::move(layer));
    });
  }
  problems.throw_if_any();
  return out;
}

// Loads the adapter in `directory` (adapter_config.json and adapter_model.safetensors), converting the
// factors to T.
template <class T>
peft_lora_adapter<T> load_peft_lora(const std::string& directory) {
  const std::filesystem::path dir(directory);
  const peft_lora_config config = read_peft_lora_config((dir / adapter_config_file).string());
  const safetensors_file file = read_safetensors((dir / adapter_model_file).string());
  return load_peft_lora<T>(config, file);
}

namespace detail {

// A layer of rank r above min(out, fan_in) is refused when written, as load_peft_lora refuses it.
inline void check_peft_rank(const std::string& where, index r, index out, index fan_in) {
  if (r > std::min(out, fan_in))
    throw format_error(where + " has rank " + std::to_string(r) + ", above min(out, fan_in) = " +
                       std::to_string(std::min(out, fan_in)) + " (PEFT accepts it; ΔW cannot use the extra rank)");
}

// A layer's shapes: weight_shape (out, in, k…) of rank 2 to 5 fits A (r, fan_in) and B (out, r), r ≥ 1.
// Returns r.
template <class T>
index check_peft_layer_shapes(const std::string& where, const lora<T>& layer, const std::vector<index>& weight_shape) {
  const index fan_in = weight_shape.size() < 2 ? -1
                       : tensor_adapters::detail::bounded_product(
                             [&](int d) { return weight_shape[static_cast<std::size_t>(d)]; }, 1,
                             int(weight_shape.size()), std::numeric_limits<index>::max());
  const index r = layer.A.dimension(0);
  if (weight_shape.size() > 5 || fan_in < 1 || weight_shape[0] != layer.B.dimension(0) ||
      fan_in != layer.A.dimension(1) || r != layer.B.dimension(1) || r < 1)
    throw format_error(where + ": weight shape " + shape_text(weight_shape) + " does not fit A " +
                       tensor_adapters::detail::shape_string(layer.A) + " and B " +
                       tensor_adapters::detail::shape_string(layer.B));
  check_peft_rank(where, r, weight_shape[0], fan_in);
  return r;
}

// The rank_pattern / alpha_pattern key that selects exactly `module` under PEFT's rule: "^" and the name
// with the regular expressions' special characters escaped, so that (.*\.)?(^name)$ matches the name from
// its start and nothing else (PEFT documents "^" keys for this), in Python's re and in ECMAScript alike.
inline std::string peft_module_key(const std::string& module) {
  std::string key = "^";
  for (const char ch : module) {
    if (std::string_view("\\^$.|?*+()[]{}").find(ch) != std::string_view::npos) key += '\\';
    key += ch;
  }
  return key;
}

}  // namespace detail

// Adds (or replaces) the layer for `module` with the given alpha: sets its scale from the config's
// use_rslora, and where the config's patterns and defaults do not already give this module its rank and
// alpha, adds rank_pattern / alpha_pattern entries that select exactly this module (see
// detail::peft_module_key), first, replacing such an entry from an earlier call; it adds this module to
// target_modules where the list does not select it, and a config without target_modules (every module)
// gets the list of its layers so far and this one. weight_shape is the adapted weight's shape, (O, I) or
// (O, in, kh, kw). Throws format_error, leaving the adapter as it was, if the shape does not fit the
// adapter, the rank is above min(out, fan_in), the config's target_modules regex does not select the
// module or its exclude_modules or layers_to_transform leave it out, or the config would be one
// load_peft_lora refuses.
template <class T>
void add_peft_lora_layer(peft_lora_adapter<T>& adapter, const std::string& module, lora<T> layer,
                         const std::vector<index>& weight_shape, double alpha) {
  const std::string where = "PEFT adapter module \"" + module + "\"";
  const index r = detail::check_peft_layer_shapes(where, layer, weight_shape);
  peft_lora_config c = adapter.config;
  if (!c.target_modules_regex.empty() && !peft_targets(c, module))
    throw format_error(where + " is not selected by target_modules \"" + c.target_modules_regex + "\"");
  const std::string key = detail::peft_module_key(module);
  const auto is_key = [&](const auto& entry) { return entry.first == key; };
  c.rank_pattern.erase(std::remove_if(c.rank_pattern.begin(), c.rank_pattern.end(), is_key), c.rank_pattern.end());
  c.alpha_pattern.erase(std::remove_if(c.alpha_pattern.begin(), c.alpha_pattern.end(), is_key),
                        c.alpha_pattern.end());
  if (peft_rank(c, module) != r) c.rank_pattern.insert(c.rank_pattern.begin(), {key, r});
  if (peft_alpha(c, module) != alpha) c.alpha_pattern.insert(c.alpha_pattern.begin(), {key, alpha});
  if (!peft_targets(c, module) || (c.target_modules.empty() && c.target_modules_regex.empty())) {
    // A config without target_modules selects every module: its list becomes the layers it selected.
    if (c.target_modules.empty())
      for (const auto& kv : adapter.layers) c.target_modules.push_back(kv.first);
    if (std::find(c.target_modules.begin(), c.target_modules.end(), module) == c.target_modules.end())
      c.target_modules.push_back(module);
  }
  if (!peft_targets(c, module))
    throw format_error(where + " is left out by the config's exclude_modules or layers_to_transform");
  parse_peft_lora_config(peft_lora_config_json(c), where + "'s adapter config");  // as the loader will read it
  layer.scale = static_cast<T>(lora_scale(alpha, r, c.use_rslora));
  adapter.layers[module] = peft_lora_layer<T>{std::move(layer), weight_shape};
  adapter.config = std::move(c);
}

// Writes `adapter` to `directory` (created if needed) as PEFT does: adapter_config.json and
// adapter_model.safetensors with "__metadata__": {"format": "pt"}, factors stored as `type` (F32, F64, F16
// or BF16). Throws format_error, before writing anything, if the config is one load_peft_lora refuses (r or
// a rank_pattern value outside [1, 2^30], a non-finite alpha, an invalid pattern), if a layer's rank or
// scale is not what the config gives its module, if the config does not target it, if its shapes do not
// fit its weight shape, or if its rank is above min(out, fan_in) (which load_peft_lora refuses).
// A config without target_modules is saved with the adapted modules' full names as its list.
template <class T>
void save_peft_lora(const peft_lora_adapter<T>& adapter, const std::string& directory, dtype type = dtype_of<T>()) {
  peft_lora_config c = adapter.config;
  if (c.target_modules.empty() && c.target_modules_regex.empty())
    for (const auto& kv : adapter.layers) c.target_modules.push_back(kv.first);
  const std::string config_json = peft_lora_config_json(c);
  parse_peft_lora_config(config_json, "the PEFT adapter's config");  // as the loader will read it
  safetensors_writer w;
  w.set_metadata("format", "pt");
  for (const auto& [module, layer] : adapter.layers) {
    const std::string where = "PEFT adapter module \"" + module + "\"";
    const lora<T>& a = layer.adapter;
    const std::vector<index>& ws = layer.weight_shape;
    const index r = detail::check_peft_layer_shapes(where, a, ws);
    if (peft_rank(c, module) != r)
      throw format_error(where + " has rank " + std::to_string(r) + " but the config gives it rank " +
                         std::to_string(peft_rank(c, module)));
    const double scale = peft_scale(c, module);
    if (!(std::fabs(static_cast<double>(a.scale) - scale) <=
          64 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::fabs(scale)))
      throw format_error(where + " has scale " + std::to_string(static_cast<double>(a.scale)) +
                         " but the config gives it " + std::to_string(scale) + " (alpha " +
                         std::to_string(peft_alpha(c, module)) + ", rank " + std::to_string(r) +
                         (c.use_rslora ? ", rsLoRA)" : ")"));
    if (!peft_targets(c, module)) throw format_error(where + " is not selected by the config's target_modules");
    std::vector<index> a_shape(ws.begin(), ws.end()), b_shape(ws.size(), 1);
    a_shape[0] = r;
    b_shape[0] = ws[0];
    b_shape[1] = r;
    w.add_values(peft_prefix + module + peft_a_suffix, a.A.data(), a_shape, type);
    w.add_values(peft_prefix + module + peft_b_suffix, a.B.data(), b_shape, type);
  }
  detail::write_adapter_directory(directory, w, config_json);
}

}  // namespace tensor_adapters::io
