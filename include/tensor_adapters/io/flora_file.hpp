// FLoRA adapters on disk (optional: needs nlohmann-json through io/safetensors.hpp).
//
// The tensors keep the official FLoRA code's names, shapes and mode order. That code wraps an adapted
// module <m> as {base_layer, flora_layer}, so its state dict holds, per module:
//
//   <m>.flora_layer.param_G   (r_in, r_out, r_k…)     the core, modes ordered (in, out, k…)
//   <m>.flora_layer.param_0   (in, r_in)              mode 0 of the official order: the input channels
//   <m>.flora_layer.param_1   (out, r_out)            mode 1: the output channels
//   <m>.flora_layer.param_2 … (k, r_k)                the kernel modes (conv2d: kh, kw; conv3d: kd, kh, kw)
//
// for a weight (out, in, k…) — linear (out, in) has N = 2 modes, conv2d N = 4, conv3d N = 5 (a grouped
// conv: in/groups). adapter_model.safetensors holds these tensors (with "__metadata__": {"format": "pt"});
// loading also accepts keys without the ".flora_layer" part (<m>.param_G, …). The official code computes
// ΔW = scale · transpose01(param_G ×0 param_0 ×1 param_1 …); this library orders the modes as the weight
// does, so loading exchanges the first two factors and the first two core modes (flora_from_official)
// and saving exchanges them back (flora_to_official). Nothing else changes.
//
// adapter_config.json is the library's own (the official code keeps its flora_cfg in the training
// script): "peft_type": "FLORA", "scale" (the official flora_cfg's scale, one for every layer) and
// "target_modules", the list of adapted module names (optional on load; when given, every listed module
// must have tensors and every module with tensors must be listed).
//
// Loading checks every key, shape and value before returning: each module has param_G of rank 2 to 5 and
// exactly param_0 … param_(N-1), each (extent, r_n) with r_n the core's extent and 1 ≤ r_n ≤ extent.
// Errors raise io::format_error naming the file, the module and the tensor; every module is checked and all
// problems are reported together, one per line.
//
// Example (a layer is a flora_any<T>, a std::variant over the ranks 2 to 5; a conv weight's is rank 4):
//   auto adapter = tensor_adapters::io::load_flora_adapter<float>("out/flora");
//   const auto& layer = std::get<tensor_adapters::flora<float, 4>>(adapter.layers.at("features.3.dwconv"));
//   tensor_adapters::merge(layer, my_weight_view);  // a tensor_view<float, 4> of the conv weight
#pragma once

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "../flora.hpp"
#include "detail/adapter_files.hpp"
#include "safetensors.hpp"

namespace tensor_adapters::io {

struct flora_adapter_config {
  double scale = 1.0;                       // ΔW = scale · …, every layer
  std::vector<std::string> target_modules;  // the adapted modules; empty: not recorded
};

// One adapted module, whatever its weight's rank: linear (2), conv1d (3), conv2d (4), conv3d (5).
template <class T>
using flora_any = std::variant<flora<T, 2>, flora<T, 3>, flora<T, 4>, flora<T, 5>>;

// A loaded adapter: the config and the layers (in this library's mode order) by module name.
template <class T>
struct flora_adapter {
  flora_adapter_config config;
  std::map<std::string, flora_any<T>> layers;
};

// The part of a key between the module name and the official parameter name.
inline const std::string flora_layer_infix = ".flora_layer.";

// The shape (out, in, k…) of the weight a layer adapts.
template <class T>
std::vector<index> flora_weight_shape(const flora_any<T>& layer) {
  return std::visit(
      [](const auto& a) {
        const auto s = weight_shape(a);
        return std::vector<index>(s.begin(), s.end());
      },
      layer);
}

// Parses adapter_config.json text of a FLoRA adapter. `name` names it in messages. Throws format_error on
// invalid JSON, duplicate keys, a peft_type other than FLORA (the field is required), a missing or
// non-finite scale, or a target_modules that is not a list of names.
inline flora_adapter_config parse_flora_adapter_config(const std::string& text, const std::string& name) {
  const nlohmann::ordered_json j = detail::parse_json_strict(text.data(), text.size(), name);
  if (!j.is_object()) throw format_error(name + ": the config is not a JSON object");
  detail::check_peft_type(j, "FLORA", true, name);
  flora_adapter_config c;
  const nlohmann::ordered_json* s = detail::json_field(j, "scale");
  if (!s || !s->is_number() || !std::isfinite(s->get<double>()))
    throw format_error(name + ": \"scale\" must be a finite number");
  c.scale = s->get<double>();
  if (const nlohmann::ordered_json* p = detail::json_field(j, "target_modules")) {
    if (!p->is_array()) throw format_error(name + ": \"target_modules\" must be a list of module names");
    for (const auto& t : *p) {
      if (!t.is_string())
        throw format_error(name + ": \"target_modules\" holds " + detail::json_excerpt(t) + ", not a string");
      c.target_modules.push_back(t.get<std::string>());
    }
  }
  return c;
}

// The adapter_config.json text for this config. Throws format_error if a module name is not valid UTF-8.
inline std::string flora_adapter_config_json(const flora_adapter_config& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  j["peft_type"] = "FLORA";
  detail::json_number(j, "scale", c.scale);
  j["target_modules"] = c.target_modules;
  return detail::config_text(j, "FLoRA adapter config");
}

namespace detail {

// The official tensors of one module, found in a file.
struct flora_official_keys {
  const tensor_info* G = nullptr;
  std::map<int, const tensor_info*> params;  // n → param_n
};

template <class T, int N>
flora<T, N> flora_from_file(const safetensors_file& file, const flora_official_keys& keys, double scale) {
  Eigen::DSizes<index, N> core;
  for (int n = 0; n < N; ++n) core[n] = keys.G->shape[static_cast<std::size_t>(n)];
  tensor<T, N> g(core);
  const std::vector<T> gv = file.template load_values<T>(keys.G->name);
  std::copy(gv.begin(), gv.end(), g.data());
  std::array<tensor<T, 2>, N> params;
  for (int n = 0; n < N; ++n) {
    const tensor_info& p = *keys.params.at(n);
    params[static_cast<std::size_t>(n)].resize(p.shape[0], p.shape[1]);
    const std::vector<T> v = file.template load_values<T>(p.name);
    std::copy(v.begin(), v.end(), params[static_cast<std::size_t>(n)].data());
  }
  return flora_from_official<T, N>(g, params, static_cast<T>(scale));
}

}  // namespace detail

// Builds the adapter from adapter_config.json text and adapter_model.safetensors. Throws format_error
// naming the file, the module and the tensor for a key that is not an official FLoRA parameter, a
// missing or surplus param_n, a shape that does not fit the core, or a module target_modules does not
// list (or a listed module without tensors).
template <class T>
flora_adapter<T> load_flora_adapter(const std::string& config_text, const std::string& config_name,
                                    const safetensors_file& file) {
  flora_adapter<T> out;
  out.config = parse_flora_adapter_config(config_text, config_name);
  const std::string& fname = file.name();
  auto fail = [&](const std::string& message) -> void { throw format_error(fname + ": " + message); };
  detail::problem_list problems;

  std::map<std::string, detail::flora_official_keys> modules;
  for (const tensor_info& t : file.tensors()) {
    problems.check([&] {
      const std::size_t dot = t.name.rfind('.');
      const std::string param = dot == std::string::npos ? t.name : t.name.substr(dot + 1);
      int n = -1;  // -1: param_G
      bool ok = dot != std::string::npos && dot > 0 && detail::starts_with(param, "param_") && param.size() > 6;
      if (ok && param != "param_G") {
        ok = param.size() <= 7 && std::isdigit(static_cast<unsigned char>(param[6]));
        if (ok) n = param[6] - '0';
      }
      if (!ok)
        fail("tensor \"" + t.name + "\" is not an official FLoRA parameter (<module>.flora_layer.param_G or " +
             ".param_<n>)");
      std::string module = t.name.substr(0, dot);
      if (detail::ends_with(module, ".flora_layer")) module.resize(module.size() - 12);
      detail::flora_official_keys& keys = modules[module];
      const tensor_info*& slot = n < 0 ? keys.G : keys.params[n];
      if (slot)
        fail("module \"" + module + "\" has " + param + " twice: \"" + slot->name + "\" and \"" + t.name + "\"");
      slot = &t;
    });
  }

  for (const auto& entry : modules) {
    const std::string& module = entry.first;
    const detail::flora_official_keys& keys = entry.second;
    problems.check([&] {
      const std::string where = "module \"" + module + "\"";
      const std::string prefix = module + flora_layer_infix;
      if (!keys.G) fail(where + " has factors but no " + prefix + "param_G");
      const std::vector<index>& g = keys.G->shape;
      const int N = static_cast<int>(g.size());
      if (N < 2 || N > 5)
        fail(where + ": " + keys.G->name + " has shape " + detail::shape_text(g) +
             "; the core has rank 2 (linear) to 5 (conv3d)");
      std::string missing;
      for (int n = 0; n < N; ++n)
        if (!keys.params.count(n)) missing += (missing.empty() ? "" : ", ") + prefix + "param_" + std::to_string(n);
      if (!missing.empty())
        fail(where + " has a core " + detail::shape_text(g) + " of " + std::to_string(N) + " modes but lacks " + missing);
      for (const auto& [n, p] : keys.params) {
        if (n >= N)
          fail(where + ": " + p->name + " has no mode in the core " + keys.G->name + " " + detail::shape_text(g) +
               " (param_0 … param_" + std::to_string(N - 1) + ")");
        const index r = g[static_cast<std::size_t>(n)];
        if (p->shape.size() != 2 || p->shape[1] != r || r < 1 || p->shape[0] < r)
          fail(where + ": " + p->name + " has shape " + detail::shape_text(p->shape) + " but the core " + keys.G->name +
               " " + detail::shape_text(g) + " needs (extent, " + std::to_string(r) + ") with extent ≥ " +
               std::to_string(r) + " ≥ 1");
      }
      index elements = 1;  // the weight's, Π extent_n
      for (const auto& [n, p] : keys.params) {
        if (p->shape[0] > std::numeric_limits<index>::max() / elements)
          fail(where + ": the weight's extents (the rows of param_0 … param_" + std::to_string(N - 1) +
               ") have a product beyond the largest index");
        elements *= p->shape[0];
      }
      const auto& targets = out.config.target_modules;
      if (!targets.empty() && std::find(targets.begin(), targets.end(), module) == targets.end())
        fail(where + " has FLoRA tensors but adapter_config.json's target_modules does not list it");
      const double scale = out.config.scale;
      switch (N) {
        case 2: out.layers.emplace(module, detail::flora_from_file<T, 2>(file, keys, scale)); break;
        case 3: out.layers.emplace(module, detail::flora_from_file<T, 3>(file, keys, scale)); break;
        case 4: out.layers.emplace(module, detail::flora_from_file<T, 4>(file, keys, scale)); break;
        default: out.layers.emplace(module, detail::flora_from_file<T, 5>(file, keys, scale)); break;
      }
    });
  }
  for (const std::string& m : out.config.target_modules)
    if (!modules.count(m))
      problems.add(fname + ": adapter_config.json's target_modules lists \"" + m + "\" but the file has no " + m +
                   flora_layer_infix + "param_G, param_0, …");
  problems.throw_if_any();
  return out;
}

// Loads the FLoRA adapter in `directory` (adapter_config.json and adapter_model.safetensors), converting
// the tensors to T and the modes to this library's order.
template <class T>
flora_adapter<T> load_flora_adapter(const std::string& directory) {
  const std::filesystem::path dir(directory);
  const std::string config_path = (dir / adapter_config_file).string();
  const std::string text = detail::read_text_file(config_path);
  const safetensors_file file = read_safetensors((dir / adapter_model_file).string());
  return load_flora_adapter<T>(text, config_path, file);
}

// Writes `adapter` to `directory` (created if needed): adapter_model.safetensors with the official
// tensors of every layer (<m>.flora_layer.param_G, param_0, …; modes back in the official order) stored
// as `type` (F32, F64, F16 or BF16), "__metadata__": {"format": "pt"}, and adapter_config.json. Throws
// format_error, before writing anything, if the config's scale is not finite, a layer's shapes are
// inconsistent, its scale is not the config's, or a non-empty target_modules does not list it or lists a
// module the adapter lacks. An empty target_modules is saved as the list of the adapted modules.
template <class T>
void save_flora_adapter(const flora_adapter<T>& adapter, const std::string& directory, dtype type = dtype_of<T>()) {
  flora_adapter_config c = adapter.config;
  const bool list_modules = c.target_modules.empty();
  for (const std::string& m : c.target_modules)  // as load_flora_adapter requires
    if (!adapter.layers.count(m))
      throw format_error("FLoRA adapter: the config's target_modules lists \"" + m +
                         "\" but the adapter has no such layer");
  safetensors_writer w;
  w.set_metadata("format", "pt");
  for (const auto& entry : adapter.layers) {
    const std::string& module = entry.first;
    const flora_any<T>& layer = entry.second;
    const std::string where = "FLoRA adapter module \"" + module + "\"";
    if (list_modules) c.target_modules.push_back(module);
    else if (std::find(c.target_modules.begin(), c.target_modules.end(), module) == c.target_modules.end())
      throw format_error(where + " is not listed in the config's target_modules");
    std::visit(
        [&](const auto& a) {
          constexpr int N = std::decay_t<decltype(a.G)>::NumIndices;
          const double s = static_cast<double>(a.scale);
          if (!(std::fabs(s - c.scale) <= 64 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::fabs(c.scale)))
            throw format_error(where + " has scale " + std::to_string(s) + " but the config's scale is " +
                               std::to_string(c.scale));
          tensor<T, N> g;
          std::array<tensor<T, 2>, N> params;
          try {
            flora_to_official<T, N>(a, g, params);
          } catch (const argument_error& e) {
            throw format_error(where + ": " + e.what());
          }
          auto add = [&](const std::string& name, const auto& t) {
            std::vector<index> shape(t.dimensions().begin(), t.dimensions().end());
            w.add_values(module + flora_layer_infix + name, t.data(), shape, type);
          };
          add("param_G", g);
          for (int n = 0; n < N; ++n) add("param_" + std::to_string(n), params[static_cast<std::size_t>(n)]);
        },
        layer);
  }
  const std::string config_json = flora_adapter_config_json(c);
  parse_flora_adapter_config(config_json, "the FLoRA adapter's config");  // as the loader will read it
  detail::write_adapter_directory(directory, w, config_json);
}

}  // namespace tensor_adapters::io
