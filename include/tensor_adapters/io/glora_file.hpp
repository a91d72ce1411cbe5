// GLoRA adapters on disk (optional: needs nlohmann-json through io/safetensors.hpp).
//
// The format follows the PEFT-style GLoRA code (a GLoraLayer holds its store as plain parameters
// glora_Ad … glora_E), written as PEFT writes an adapter directory:
//
//   adapter_model.safetensors  for each adapted module <m> (its name in the base model), the store:
//                                base_model.model.<m>.glora_Ad  (O, R)    base_model.model.<m>.glora_Au  (R, I)
//                                base_model.model.<m>.glora_Bd  (O, R)    base_model.model.<m>.glora_Bu  (R, I)
//                                base_model.model.<m>.glora_Cd  (I, R)    base_model.model.<m>.glora_Cu  (R, 1)
//                                base_model.model.<m>.glora_D   (O)       base_model.model.<m>.glora_E   (O)
//                              for a weight (O, I) (a conv weight (O, in, k…) is seen as (O, in·k…)), and
//                              "__metadata__": {"format": "pt"}.
//   adapter_config.json        "peft_type": "GLORA", "r" (the maximum rank R of every store),
//                              "target_modules", and PEFT's other fields ("bias": "none", …).
//
// Conventions of the GLoRA code that are followed: the parameter names and shapes above (the
// vision code's SuperScalableLinear names the same tensors Ad … E, without the prefix); one R for
// every layer; target_modules as that code reads it — a list selects module m when m ends with an entry
// (any suffix: unlike LoRA's PEFT rule there is no '.' boundary), a string is a regular expression that
// must match the whole name (within the pattern and module-name limits io/peft.hpp describes); PEFT's
// layers_to_transform, layers_pattern and exclude_modules, which that rule does not apply, are refused
// unless null.
//
// The library's own addition: "eval_config", an object mapping a module to the configuration the layer
// has fixed for evaluation and merging (the GLoRA code keeps it as the layer attribute eval_config
// and stores it nowhere). The value is glora.hpp's text form, "A=lora_4,B=vector,C=none,D=scalar,E=vector",
// or the code's own dictionary {"A": "LoRA_4", "B": "vector", "C": "none", "D": "constant", "E": "vector"};
// saving writes the text form. A module without an entry is a supernet layer whose configuration is
// still open (search picks it).
//
// Loading checks every key, shape and value before returning: each module has all eight tensors, their
// shapes agree with one (O, I, R), R is the config's r, target_modules selects the module, and each
// eval_config entry names a module of the file and is a legal configuration for R. Errors raise
// io::format_error naming the file, the module and the tensor; every module is checked and all problems
// are reported together, one per line (every missing tensor of a module on one line).
//
// Example:
//   auto adapter = tensor_adapters::io::load_glora_adapter<float>("out/glora");
//   const auto& layer = adapter.layers.at("model.layers.0.self_attn.q_proj");
//   auto merged = tensor_adapters::merge(layer.store, *layer.config, w0, b0);
#pragma once

#include <algorithm>
#include <array>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../glora.hpp"
#include "detail/adapter_files.hpp"
#include "peft.hpp"
#include "safetensors.hpp"

namespace tensor_adapters::io {

struct glora_adapter_config {
  index r = 4;  // the maximum rank R of every layer's store
  // Either a list of module names / name suffixes, or (when target_modules_regex is non-empty) a regular
  // expression the whole module name must match. Both empty: every module.
  std::vector<std::string> target_modules;
  std::string target_modules_regex;
};

// One adapted module.
template <class T>
struct glora_adapter_layer {
  glora<T> store;                     // Ad (O, R), Au (R, I), Bd (O, R), Bu (R, I), Cd (I, R), Cu (R, 1), D, E (O)
  std::optional<glora_config> config;  // the layer's fixed configuration (eval_config), if it has one
};

// A loaded adapter: the config and the layers by module name (without the "base_model.model." prefix).
template <class T>
struct glora_adapter {
  glora_adapter_config config;
  std::map<std::string, glora_adapter_layer<T>> layers;
};

// The store's tensor names, in for_each_parameter order; keys are peft_prefix + module + "." + name.
inline const std::array<const char*, 8> glora_tensor_names = {"glora_Ad", "glora_Au", "glora_Bd", "glora_Bu",
                                                              "glora_Cd", "glora_Cu", "glora_D",  "glora_E"};

// True if the config's target_modules selects `module` (the GLoRA code's rule: a list entry that the
// name ends with, or a regular expression matching the whole name; none given: every module).
inline bool glora_targets(const glora_adapter_config& c, const std::string& module) {
  if (c.target_modules.empty() && c.target_modules_regex.empty()) return true;
  if (!c.target_modules_regex.empty())
    return c.target_modules_regex == "all-linear" ||
           detail::pattern_matches(detail::compile_pattern(c.target_modules_regex, "GLoRA target_modules"), module,
                                   "GLoRA target_modules");
  for (const std::string& t : c.target_modules)
    if (detail::ends_with(module, t)) return true;
  return false;
}

namespace detail {

// Checks a configuration against R and rethrows the library's argument_error as a format_error.
inline void check_glora_file_config(const glora_config& c, index r, const std::string& where) {
  try {
    tensor_adapters::detail::check_glora_config(c, r, "GLoRA eval_config");
  } catch (const format_error&) {
    throw;
  } catch (const argument_error& e) {
    throw format_error(where + ": " + e.what());
  }
}

// An eval_config value: the text form, or the GLoRA code's dictionary {"A": "LoRA_4", …}.
inline glora_config parse_glora_eval_config(const nlohmann::ordered_json& v, const std::string& where) {
  std::string text;
  if (v.is_string()) {
    text = v.get<std::string>();
  } else if (v.is_object()) {
    for (const char* k : {"A", "B", "C", "D", "E"}) {
      auto it = v.find(k);
      if (it == v.end() || !it->is_string())
        throw format_error(where + " has no string \"" + k + "\" in " + detail::json_excerpt(v));
      text += std::string(text.empty() ? "" : ",") + k + "=" + it->get<std::string>();
    }
    if (v.size() != 5)
      throw format_error(where + " has keys other than A, B, C, D, E: " + detail::json_excerpt(v));
  } else {
    throw format_error(where + " must be a string such as \"A=lora_4,B=vector,C=none,D=scalar,E=vector\" or an " +
                       "object {\"A\": …, …, \"E\": …}, not " + detail::json_excerpt(v));
  }
  try {
    return parse_glora_config(text);
  } catch (const argument_error& e) {
    throw format_error(where + ": " + e.what());
  }
}

}  // namespace detail

// Parses adapter_config.json text of a GLoRA adapter into the config and the eval_config entries
// (module → configuration). `name` names it in messages. Throws format_error on invalid JSON, duplicate
// keys, a peft_type other than GLORA (the field is required), a missing or mistyped r, target_modules or
// eval_config entry, an empty target_modules list, a bias other than "none", or a layers_to_transform,
// layers_pattern or exclude_modules other than null.
inline glora_adapter_config parse_glora_adapter_config(const std::string& text, const std::string& name,
                                                       std::map<std::string, glora_config>* eval_configs = nullptr) {
  const nlohmann::ordered_json j = detail::parse_json_strict(text.data(), text.size(), name);
  if (!j.is_object()) throw format_error(name + ": the config is not a JSON object");
  detail::check_peft_type(j, "GLORA", true, name);
  glora_adapter_config c;
  const nlohmann::ordered_json* r = detail::json_field(j, "r");
  if (!r || !r->is_number_unsigned() || r->get<std::uint64_t>() < 1 || r->get<std::uint64_t>() > (1u << 30))
    throw format_error(name + ": \"r\" must be a positive integer");
  c.r = static_cast<index>(r->get<std::uint64_t>());
  if (auto* p = detail::json_field(j, "bias"); p && !(p->is_string() && p->get<std::string>() == "none"))
    throw format_error(name + ": \"bias\" is " + detail::json_excerpt(*p) + "; only \"none\" is supported");
  detail::parse_target_modules(j, name, c.target_modules, c.target_modules_regex);
  // PEFT's narrowing of target_modules: the GLoRA code selects by target_modules alone, so a config
  // that narrows it would be read as selecting more modules than it does.
  for (const char* key : {"layers_to_transform", "layers_pattern", "exclude_modules"})
    if (auto* p = detail::json_field(j, key))
      throw format_error(name + ": \"" + key + "\" is " + detail::json_excerpt(*p) +
                         "; GLoRA adapters select modules by target_modules alone (null or absent)");
  if (auto* p = detail::json_field(j, "eval_config")) {
    if (!p->is_object()) throw format_error(name + ": \"eval_config\" must be an object mapping modules to configurations");
    for (auto it = p->begin(); it != p->end(); ++it) {
      const std::string where = name + ": eval_config[\"" + it.key() + "\"]";
      const glora_config config = detail::parse_glora_eval_config(it.value(), where);
      detail::check_glora_file_config(config, c.r, where);
      if (eval_configs) (*eval_configs)[it.key()] = config;
    }
  }
  return c;
}

// The adapter_config.json text for this config and the layers' fixed configurations. Throws format_error
// if a module name is not valid UTF-8.
template <class T>
std::string glora_adapter_config_json(const glora_adapter<T>& adapter) {
  const glora_adapter_config& c = adapter.config;
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  j["base_model_name_or_path"] = nullptr;
  j["bias"] = "none";
  nlohmann::ordered_json eval = nlohmann::ordered_json::object();
  for (const auto& [module, layer] : adapter.layers)
    if (layer.config) eval[module] = to_string(*layer.config);
  j["eval_config"] = eval;
  j["inference_mode"] = true;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "GLORA";
  j["r"] = c.r;
  j["revision"] = nullptr;
  detail::json_target_modules(j, c.target_modules, c.target_modules_regex);
  j["task_type"] = nullptr;
  return detail::config_text(j, "GLoRA adapter config");
}

// Builds the adapter from adapter_config.json text and adapter_model.safetensors. Throws format_error
// naming the file, the module and the tensor for an unexpected key, missing tensors, shapes that do not
// agree, a rank other than the config's r, a module target_modules does not select, or an eval_config
// entry for a module the file does not have.
template <class T>
glora_adapter<T> load_glora_adapter(const std::string& config_text, const std::string& config_name,
                                    const safetensors_file& file) {
  std::map<std::string, glora_config> eval_configs;
  glora_adapter<T> out;
  out.config = parse_glora_adapter_config(config_text, config_name, &eval_configs);
  const std::string& fname = file.name();
  auto fail = [&](const std::string& message) -> void { throw format_error(fname + ": " + message); };
  detail::problem_list problems;

  std::map<std::string, std::array<const tensor_info*, 8>> modules;
  for (const tensor_info& t : file.tensors()) {
    problems.check([&] {
      std::size_t which = glora_tensor_names.size();
      for (std::size_t k = 0; k < glora_tensor_names.size() && which == glora_tensor_names.size(); ++k)
        if (detail::ends_with(t.name, std::string(".") + glora_tensor_names[k])) which = k;
      if (!detail::starts_with(t.name, peft_prefix) || which == glora_tensor_names.size() ||
          t.name.size() <= peft_prefix.size() + std::string(glora_tensor_names[which]).size() + 1)
        fail("tensor \"" + t.name + "\" is not a GLoRA store tensor (base_model.model.<module>.glora_Ad, _Au, _Bd, " +
             "_Bu, _Cd, _Cu, _D or _E)");
      const std::string module = t.name.substr(
          peft_prefix.size(), t.name.size() - peft_prefix.size() - std::string(glora_tensor_names[which]).size() - 1);
      auto& slots = modules.emplace(module, std::array<const tensor_info*, 8>{}).first->second;
      slots[which] = &t;
    });
  }

  for (const auto& entry : modules) {
    problems.check([&] {
      const std::string& module = entry.first;
      const std::array<const tensor_info*, 8>& slots = entry.second;
      const std::string where = "module \"" + module + "\"";
      auto key = [&](std::size_t k) { return peft_prefix + module + "." + glora_tensor_names[k]; };
      std::string missing;
      for (std::size_t k = 0; k < slots.size(); ++k)
        if (!slots[k]) missing += (missing.empty() ? "" : ", ") + key(k);
      if (!missing.empty()) fail(where + " lacks " + missing);
      const std::vector<index>& ad = slots[0]->shape;
      const std::vector<index>& au = slots[1]->shape;
      if (ad.size() != 2 || au.size() != 2)
        fail(where + ": " + key(0) + " " + detail::shape_text(ad) + " and " + key(1) + " " + detail::shape_text(au) +
             " must be matrices (O, R) and (R, I)");
      const index o = ad[0], r = ad[1], in = au[1];
      const std::vector<index> expected[8] = {{o, r}, {r, in}, {o, r}, {r, in}, {in, r}, {r, 1}, {o}, {o}};
      std::string wrong;
      for (std::size_t k = 0; k < slots.size(); ++k)
        if (slots[k]->shape != expected[k])
          wrong += (wrong.empty() ? "" : "; ") + key(k) + " has shape " + detail::shape_text(slots[k]->shape) +
                   ", expected " + detail::shape_text(expected[k]);
      if (!wrong.empty())
        fail(where + ": the store's shapes disagree with (O, I, R) = (" + std::to_string(o) + ", " + std::to_string(in) +
             ", " + std::to_string(r) + ") from " + key(0) + " and " + key(1) + ": " + wrong);
      if (o < 1 || in < 1 || r < 1)
        fail(where + ": the store is empty (" + key(0) + " " + detail::shape_text(ad) + ", " + key(1) + " " +
             detail::shape_text(au) + ")");
      if (r > std::min(o, in))
        fail(where + ": the store has rank " + std::to_string(r) + " in " + key(0) + ", above min(O, I) = " +
             std::to_string(std::min(o, in)));
      if (r != out.config.r)
        fail(where + " has maximum rank " + std::to_string(r) + " in " + key(0) + " but adapter_config.json's r is " +
             std::to_string(out.config.r));
      if (!glora_targets(out.config, module))
        fail(where + " has a GLoRA store but adapter_config.json's target_modules does not select it");

      glora_adapter_layer<T> layer;
      std::size_t k = 0;
      for_each_parameter(layer.store, [&](const char*, auto& tensor) {
        Eigen::DSizes<index, std::decay_t<decltype(tensor)>::NumIndices> dims;
        for (int d = 0; d < static_cast<int>(dims.size()); ++d) dims[d] = expected[k][static_cast<std::size_t>(d)];
        tensor.resize(dims);
        const std::vector<T> values = file.template load_values<T>(slots[k]->name);
        std::copy(values.begin(), values.end(), tensor.data());
        ++k;
      });
      auto it = eval_configs.find(module);
      if (it != eval_configs.end()) layer.config = it->second;
      out.layers.emplace(module, std::move(layer));
    });
  }
  for (const auto& kv : eval_configs)
    if (!modules.count(kv.first))
      problems.add(config_name + ": eval_config names module \"" + kv.first + "\", which has no tensors in " + fname);
  problems.throw_if_any();
  return out;
}

// Loads the GLoRA adapter in `directory` (adapter_config.json and adapter_model.safetensors), converting
// the store to T.
template <class T>
glora_adapter<T> load_glora_adapter(const std::string& directory) {
  const std::filesystem::path dir(directory);
  const std::string config_path = (dir / adapter_config_file).string();
  const std::string text = detail::read_text_file(config_path);
  const safetensors_file file = read_safetensors((dir / adapter_model_file).string());
  return load_glora_adapter<T>(text, config_path, file);
}

// Writes `adapter` to `directory` (created if needed): adapter_model.safetensors with the store of
// every layer stored as `type` (F32, F64, F16 or BF16) and "__metadata__": {"format": "pt"}, and
// adapter_config.json. Throws format_error, before writing anything, if the config is one
// load_glora_adapter would refuse (r outside [1, 2^30], an invalid target_modules regex), a module's
// name is empty, a store's shapes disagree, its R is not the config's r, the config does not target
// its module, or its configuration is not legal for R. A config without target_modules is saved with the
// adapted modules' full names as its list.
template <class T>
void save_glora_adapter(const glora_adapter<T>& adapter, const std::string& directory, dtype type = dtype_of<T>()) {
  glora_adapter<T> a = adapter;
  glora_adapter_config& c = a.config;
  if (c.target_modules.empty() && c.target_modules_regex.empty())
    for (const auto& kv : a.layers) c.target_modules.push_back(kv.first);
  const std::string config_json = glora_adapter_config_json(a);
  parse_glora_adapter_config(config_json, "the GLoRA adapter's config");  // as the loader will read it
  safetensors_writer w;
  w.set_metadata("format", "pt");
  for (const auto& entry : a.layers) {
    const std::string& module = entry.first;
    const glora_adapter_layer<T>& layer = entry.second;
    const std::string where = "GLoRA adapter module \"" + module + "\"";
    if (module.empty()) throw format_error("GLoRA adapter: a module's name is empty");
    try {
      tensor_adapters::detail::check_glora_store(layer.store, "save_glora_adapter");
    } catch (const argument_error& e) {
      throw format_error(where + ": " + e.what());
    }
    if (max_rank(layer.store) != c.r)
      throw format_error(where + " has maximum rank " + std::to_string(max_rank(layer.store)) +
                         " but the config's r is " + std::to_string(c.r));
    if (!glora_targets(c, module)) throw format_error(where + " is not selected by the config's target_modules");
    if (layer.config) detail::check_glora_file_config(*layer.config, c.r, where);
    for_each_parameter(layer.store, [&](const char* name, const auto& tensor) {
      std::vector<index> shape(tensor.dimensions().begin(), tensor.dimensions().end());
      w.add_values(peft_prefix + module + "." + name, tensor.data(), shape, type);
    });
  }
  detail::write_adapter_directory(directory, w, config_json);
}

}  // namespace tensor_adapters::io
