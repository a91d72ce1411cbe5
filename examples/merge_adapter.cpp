// merge_adapter: folds an adapter — PEFT LoRA, GLoRA or FLoRA — into base weights.
//
//   merge_adapter <base.safetensors> <adapter directory> <merged.safetensors> [--dtype same|F64|F32|F16|BF16]
//
// The adapter directory holds adapter_config.json and adapter_model.safetensors; the config's
// "peft_type" says which adapter it is ("LORA", or absent: io/peft.hpp; "GLORA": io/glora_file.hpp;
// "FLORA": io/flora_file.hpp). For every adapted module <m>:
//   LoRA   "<m>.weight" becomes W + scale · reshape(B · A, W.shape)
//   FLoRA  "<m>.weight" becomes W + scale · G ×0 U0 … ×(N-1) U(N-1)
//   GLoRA  "<m>.weight" becomes W + W ⊙ A + B and "<m>.bias" becomes b + b ⊙ D + E + W · C for the layer's
//          eval_config (W seen as (O, fan-in)); a layer without a bias gains "<m>.bias" = E + W · C unless
//          its C and E are none.
// Adapters are read in float64 and every merge is computed and accumulated in float64, then rounded
// once to the output dtype (by default each tensor's own dtype; an added bias takes its weight's).
// Every other tensor is copied unchanged (byte for byte unless --dtype converts it). __metadata__ is kept.
//
// Nothing is written unless every check passes: each adapted module has a floating-point base weight of
// the shape its tensors imply (and a GLoRA bias of shape (O) if it has one); each base weight of a module
// the config's target_modules selects has adapter tensors; each GLoRA layer has a fixed eval_config; every
// merged value is finite and representable in the output dtype (a tensor only converted keeps the
// infinities and NaNs it had, such as a mask's -inf, but none of its finite values may overflow the output
// dtype). The base file is mapped, not read whole: its tensors are read from it as they are used. The
// output file is written beside its path, tensor by tensor in the file's order (by element size, then
// name), holding one merged tensor at a time (a GLoRA layer's weight and bias are merged together, and
// the one written second is kept until its turn), and renamed over it once complete, so a check that
// fails while it is written, or a failed write, leaves an existing file, the base itself included, as it
// was. Each problem is reported on its own line naming the tensor. One progress line per tensor goes to
// stdout, as it is written.
// Exit status: 0 on success, 1 on a problem with the files, 2 on bad usage (0 for --help, which prints the
// usage on stdout).
#include <tensor_adapters/io/flora_file.hpp>
#include <tensor_adapters/io/glora_file.hpp>
#include <tensor_adapters/io/peft.hpp>
#include <tensor_adapters/io/safetensors.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace ta = tensor_adapters;
namespace io = tensor_adapters::io;

namespace {

// The usage line, with what was wrong (if anything) before it: on stderr with status 2, or for --help
// on stdout with status 0.
int usage(const std::string& problem = std::string(), bool asked = false) {
  std::FILE* to = asked ? stdout : stderr;
  if (!problem.empty()) std::fprintf(to, "merge_adapter: %s\n", problem.c_str());
  std::fprintf(to,
               "usage: merge_adapter <base.safetensors> <adapter directory> <merged.safetensors> "
               "[--dtype same|F64|F32|F16|BF16]\n");
  return asked ? 0 : 2;
}

std::string shape_text(const std::vector<ta::index>& s) {
  std::string t = "(";
  for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + ")";
}

std::string format(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

const std::string weight_suffix = ".weight";
const std::string bias_suffix = ".bias";

// The module of a "<m>.weight" or "<m>.bias" key; empty for any other key.
std::string module_of(const std::string& key, const std::string& suffix) {
  if (key.size() <= suffix.size() || !io::detail::ends_with(key, suffix)) return std::string();
  return key.substr(0, key.size() - suffix.size());
}

// A merged tensor that fails its checks while the output is written.
struct merge_refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What the tool does to one adapted module.
struct module_plan {
  std::string summary;                   // the progress line's description of the merge
  std::string tensors;                   // the adapter's tensors, for messages
  std::vector<ta::index> weight_shape;   // the exact base weight shape, or empty (GLoRA: any (O, …) of fan-in I)
  ta::index out = 0, fan_in = 0;         // GLoRA: the store's (O, I)
  bool glora = false;
  bool adds_bias = false;                // GLoRA: the result has a bias even if the base has none
  // LoRA, FLoRA: w ← w + ΔW, float64, shape the base weight's.
  std::function<void(std::vector<double>& w, const std::vector<ta::index>& shape)> merge_weight;
  // GLoRA: (W_eff, b_eff) from (W0, b0 or nullptr).
  std::function<void(const std::vector<double>& w0, const std::vector<double>* b0, std::vector<double>& w_eff,
                     std::vector<double>& b_eff)>
      merge_layer;
};

struct adapter_plan {
  std::string description;  // "LoRA, 8 modules (r 4, lora_alpha 8)"
  std::string missing_tensors;  // "lora_A / lora_B tensors"
  std::map<std::string, module_plan> modules;
  std::function<bool(const std::string&)> targets;  // nullptr: target_modules does not name modules
  std::vector<std::string> problems;                // found while planning
  std::set<std::string> unmergeable;                // modules with tensors that cannot be merged (reported)
};

std::string peft_type_of(const std::string& directory) {
  const std::string path = (std::filesystem::path(directory) / io::adapter_config_file).string();
  const std::string text = io::detail::read_text_file(path);
  const nlohmann::ordered_json j = io::detail::parse_json_strict(text.data(), text.size(), path);
  const nlohmann::ordered_json* p = j.is_object() ? io::detail::json_field(j, "peft_type") : nullptr;
  if (!p) return "LORA";
  if (!p->is_string()) throw io::format_error(path + ": peft_type is " + p->dump() + ", not a string");
  return p->get<std::string>();
}

adapter_plan plan_lora(const std::string& directory) {
  auto adapter = std::make_shared<io::peft_lora_adapter<double>>(io::load_peft_lora<double>(directory));
  adapter_plan plan;
  const io::peft_lora_config& c = adapter->config;
  plan.description = "LoRA, " + std::to_string(adapter->layers.size()) + " modules (r " + std::to_string(c.r) +
                     format(", lora_alpha %g", c.lora_alpha) + (c.use_rslora ? ", rsLoRA)" : ")");
  plan.missing_tensors = "lora_A / lora_B tensors";
  if (!(c.target_modules_regex == "all-linear" || (c.target_modules.empty() && c.target_modules_regex.empty())))
    plan.targets = [adapter](const std::string& m) { return io::peft_targets(adapter->config, m); };
  for (const auto& [module, layer] : adapter->layers) {
    module_plan p;
    const ta::lora<double>* a = &layer.adapter;
    p.summary = "merged LoRA rank " + std::to_string(ta::rank(*a)) + format(", scale %g", a->scale);
    p.tensors = "lora_A " + ta::detail::shape_string(a->A) + ", lora_B " + ta::detail::shape_string(a->B);
    p.weight_shape = layer.weight_shape;
    p.merge_weight = [adapter, a](std::vector<double>& w, const std::vector<ta::index>&) {
      ta::tensor_view<double, 2> view(w.data(), a->B.dimension(0), a->A.dimension(1));
      ta::safe_merge<double, 2>(*a, view);  // throws on a non-finite result
    };
    plan.modules.emplace(module, std::move(p));
  }
  return plan;
}

adapter_plan plan_flora(const std::string& directory) {
  auto adapter = std::make_shared<io::flora_adapter<double>>(io::load_flora_adapter<double>(directory));
  adapter_plan plan;
  plan.description = "FLoRA, " + std::to_string(adapter->layers.size()) + " modules" +
                     format(" (scale %g)", adapter->config.scale);
  plan.missing_tensors = "param_G / param_n tensors";
  for (const auto& [module, layer] : adapter->layers) {
    module_plan p;
    const io::flora_any<double>* a = &layer;
    p.weight_shape = io::flora_weight_shape(layer);
    std::visit(
        [&](const auto& f) {
          const auto r = ta::ranks(f);
          p.summary = "merged FLoRA ranks " + shape_text(std::vector<ta::index>(r.begin(), r.end())) +
                      format(", scale %g", f.scale);
          p.tensors = "FLoRA factors for a weight " + shape_text(p.weight_shape);
        },
        layer);
    p.merge_weight = [adapter, a](std::vector<double>& w, const std::vector<ta::index>&) {
      std::visit(
          [&](const auto& f) {
            constexpr int N = std::decay_t<decltype(f.G)>::NumIndices;
            ta::tensor_view<double, N> view(w.data(), ta::weight_shape(f));
            ta::safe_merge<double, N>(f, view);
          },
          *a);
    };
    plan.modules.emplace(module, std::move(p));
  }
  return plan;
}

adapter_plan plan_glora(const std::string& directory) {
  auto adapter = std::make_shared<io::glora_adapter<double>>(io::load_glora_adapter<double>(directory));
  adapter_plan plan;
  const io::glora_adapter_config& c = adapter->config;
  plan.description = "GLoRA, " + std::to_string(adapter->layers.size()) + " modules (r " + std::to_string(c.r) + ")";
  plan.missing_tensors = "glora_Ad … glora_E tensors";
  if (!(c.target_modules_regex == "all-linear" || (c.target_modules.empty() && c.target_modules_regex.empty())))
    plan.targets = [adapter](const std::string& m) { return io::glora_targets(adapter->config, m); };
  for (const auto& [module, layer] : adapter->layers) {
    if (!layer.config) {
      plan.problems.push_back("GLoRA module \"" + module + "\" has no eval_config in adapter_config.json: a " +
                              "supernet layer has no single configuration to merge (pick one by search and add it)");
      plan.unmergeable.insert(module);
      continue;
    }
    module_plan p;
    const io::glora_adapter_layer<double>* l = &layer;
    const ta::glora_config& config = *layer.config;
    p.glora = true;
    p.out = layer.store.Ad.dimension(0);
    p.fan_in = layer.store.Au.dimension(1);
    p.adds_bias = config.C.kind != ta::glora_kind::none || config.E.kind != ta::glora_kind::none;
    p.summary = "merged GLoRA " + ta::to_string(config);
    p.tensors = "a GLoRA store for a weight (" + std::to_string(p.out) + ", " + std::to_string(p.fan_in) + ")";
    p.merge_layer = [adapter, l, o = p.out, in = p.fan_in](const std::vector<double>& w0, const std::vector<double>* b0,
                                                           std::vector<double>& w_eff, std::vector<double>& b_eff) {
      w_eff.assign(w0.size(), 0.0);
      b_eff.assign(static_cast<std::size_t>(o), 0.0);
      ta::glora_workspace<double> ws;
      ta::const_tensor_view<double, 2> w(w0.data(), o, in);
      ta::tensor_view<double, 2> we(w_eff.data(), o, in);
      ta::tensor_view<double, 1> be(b_eff.data(), o);
      if (b0) ta::merge<double, 2>(l->store, *l->config, w, ta::const_tensor_view<double, 1>(b0->data(), o), we, be, ws);
      else ta::merge<double, 2>(l->store, *l->config, w, we, be, ws);
    };
    plan.modules.emplace(module, std::move(p));
  }
  return plan;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && (std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h")) return usage("", true);
  if (argc != 4 && argc != 6) return usage();
  const std::string base_path = argv[1], adapter_dir = argv[2], out_path = argv[3];
  bool same_dtype = true;
  io::dtype out_type = io::dtype::F32;
  if (argc == 6) {
    const std::string flag = argv[4], value = argv[5];
    if (flag != "--dtype") return usage("unknown option \"" + flag + "\"");
    if (value != "same") {
      if (!io::parse_dtype(value, out_type) || !io::is_floating(out_type))
        return usage("--dtype takes same, F64, F32, F16 or BF16, not \"" + value + "\"");
      same_dtype = false;
    }
  }

  bool writing = false;
  try {
    const io::safetensors_file base = io::map_safetensors(base_path);
    // The output is written to <output>.partial and renamed over <output>: a base of that name would be
    // replaced by the output, and so lost.
    std::error_code ec;
    if (std::filesystem::equivalent(base_path, out_path + ".partial", ec))
      throw io::format_error("the base " + base_path +
                             " is the file the output is written to before it is renamed to " + out_path);
    const std::string type = peft_type_of(adapter_dir);
    adapter_plan plan;
    if (type == "LORA") plan = plan_lora(adapter_dir);
    else if (type == "GLORA") plan = plan_glora(adapter_dir);
    else if (type == "FLORA") plan = plan_flora(adapter_dir);
    else throw io::format_error(adapter_dir + ": peft_type \"" + type + "\" is not LORA, GLORA or FLORA");
    std::printf("base %s: %zu tensors; adapter %s: %s\n", base_path.c_str(), base.tensors().size(),
                adapter_dir.c_str(), plan.description.c_str());

    // Every check before any output.
    std::vector<std::string> problems = plan.problems;
    std::vector<std::string> added;  // GLoRA biases the base lacks
    for (const auto& [module, p] : plan.modules) {
      const std::string name = module + weight_suffix;
      if (!base.contains(name)) {
        problems.push_back("the base weights have no tensor \"" + name + "\" for the adapted module \"" + module + "\"");
        continue;
      }
      const io::tensor_info& t = base.info(name);
      ta::index fan_in = 1;
      for (std::size_t d = 1; d < t.shape.size(); ++d) fan_in *= t.shape[d];
      if (!io::is_floating(t.type)) {
        problems.push_back("base tensor \"" + name + "\" has dtype " + io::dtype_name(t.type) +
                           ", which cannot take an adapter's update");
      } else if (!p.glora && t.shape != p.weight_shape) {
        problems.push_back("base tensor \"" + name + "\" has shape " + shape_text(t.shape) + " but the adapter's " +
                           "tensors for \"" + module + "\" (" + p.tensors + ") need " + shape_text(p.weight_shape));
      } else if (p.glora && (t.shape.size() < 2 || t.shape[0] != p.out || fan_in != p.fan_in)) {
        problems.push_back("base tensor \"" + name + "\" has shape " + shape_text(t.shape) + " but the adapter's " +
                           "tensors for \"" + module + "\" are " + p.tensors + ", which needs (" +
                           std::to_string(p.out) + ", …) with fan-in " + std::to_string(p.fan_in));
      }
      if (!p.glora) continue;
      const std::string bias = module + bias_suffix;
      if (base.contains(bias)) {
        const io::tensor_info& b = base.info(bias);
        if (!io::is_floating(b.type) || b.shape != std::vector<ta::index>{p.out})
          problems.push_back("base tensor \"" + bias + "\" has shape " + shape_text(b.shape) + " and dtype " +
                             io::dtype_name(b.type) + " but the GLoRA layer \"" + module +
                             "\" needs a floating-point bias (" + std::to_string(p.out) + ")");
      } else if (p.adds_bias) {
        added.push_back(bias);
      }
    }
    if (plan.targets) {
      for (const io::tensor_info& t : base.tensors()) {
        const std::string module = module_of(t.name, weight_suffix);
        if (module.empty() || t.shape.size() < 2 || !io::is_floating(t.type)) continue;
        if (plan.targets(module) && plan.modules.count(module) == 0 && plan.unmergeable.count(module) == 0)
          problems.push_back("adapter_config.json's target_modules selects \"" + module + "\" but the adapter has no " +
                             plan.missing_tensors + " for it");
      }
    }
    if (!problems.empty()) {
      for (const std::string& p : problems) std::fprintf(stderr, "merge_adapter: %s\n", p.c_str());
      std::fprintf(stderr, "merge_adapter: %zu problem(s); nothing was written\n", problems.size());
      return 1;
    }

    // The output is written tensor by tensor: each merged or converted tensor is computed, checked and
    // encoded when the writer reaches it (io::safetensors_writer::add_deferred), so the tool holds one
    // merged tensor at a time beside the mapped base. A check that fails ends the write, and the output
    // file is left as it was. GLoRA merges weight and bias together: the first of the two written
    // computes both, and the other is kept until it is written.
    struct glora_merged {
      std::vector<double> weight, bias;
      int parts_left;
    };
    std::map<std::string, glora_merged> glora_results;
    auto glora_part = [&](const std::string& module, const module_plan& p, bool weight) {
      auto it = glora_results.find(module);
      if (it == glora_results.end()) {
        const std::vector<double> w0 = base.load_values<double>(module + weight_suffix);
        std::vector<double> b0;
        const bool has_bias = base.contains(module + bias_suffix);
        if (has_bias) b0 = base.load_values<double>(module + bias_suffix);
        glora_merged m{{}, {}, has_bias || p.adds_bias ? 2 : 1};
        p.merge_layer(w0, has_bias ? &b0 : nullptr, m.weight, m.bias);
        it = glora_results.emplace(module, std::move(m)).first;
      }
      std::vector<double> part = std::move(weight ? it->second.weight : it->second.bias);
      if (--it->second.parts_left == 0) glora_results.erase(it);
      return part;
    };

    io::safetensors_writer out;
    for (const auto& [key, value] : base.metadata()) out.set_metadata(key, value);
    const std::size_t n = base.tensors().size() + added.size();
    std::size_t written = 0, merged = 0;
    auto progress = [&](const std::string& name, const std::vector<ta::index>& shape, io::dtype type,
                        const std::string& what) {
      std::printf("[%zu/%zu] %s %s %s: %s\n", ++written, n, name.c_str(), shape_text(shape).c_str(),
                  io::dtype_name(type), what.c_str());
    };
    // A tensor computed by `compute`, checked: every value must be finite in `type`, except that a
    // tensor only converted keeps the infinities and NaNs it had (a mask's -inf); only a finite value
    // that overflows `type` is refused.
    auto add = [&](const std::string& name, const std::vector<ta::index>& shape, io::dtype type, bool converted,
                   std::function<std::vector<double>(std::string& what)> compute) {
      out.add_deferred(name, shape, type, [&progress, name, shape, type, converted, compute] {
        std::string what;
        std::vector<double> w;
        try {
          w = compute(what);
        } catch (const std::exception& e) {  // a merge's argument_error, or no memory for it
          throw merge_refused("tensor \"" + name + "\": " + e.what() + "; nothing was written");
        }
        for (std::size_t k = 0; k < w.size(); ++k)
          if (!std::isfinite(io::stored_value(w[k], type)) && !(converted && !std::isfinite(w[k])))
            throw merge_refused("tensor \"" + name + "\": element " + std::to_string(k) + " (" + format("%g", w[k]) +
                                ") is not finite in " + io::dtype_name(type) + "; nothing was written");
        progress(name, shape, type, what);
        return w;
      });
    };
    for (const io::tensor_info& t : base.tensors()) {
      const io::dtype type = same_dtype || !io::is_floating(t.type) ? t.type : out_type;
      const std::string weight_module = module_of(t.name, weight_suffix), bias_module = module_of(t.name, bias_suffix);
      auto wp = plan.modules.find(weight_module);
      auto bp = plan.modules.find(bias_module);
      const bool is_weight = !weight_module.empty() && wp != plan.modules.end();
      const bool is_bias = !bias_module.empty() && bp != plan.modules.end() && bp->second.glora;

      if (!is_weight && !is_bias && type == t.type) {
        out.add_raw_deferred(t.name, t.type, t.shape, [&base, &t, &progress] {
          const unsigned char* data = base.raw(t);
          progress(t.name, t.shape, t.type, "copied");
          return std::vector<unsigned char>(data, data + (t.end - t.begin));
        });
      } else if (is_weight) {
        const module_plan& p = wp->second;
        add(t.name, t.shape, type, false, [&, module = weight_module](std::string& what) {
          what = p.summary;
          ++merged;
          if (p.glora) return glora_part(module, p, true);
          std::vector<double> w = base.load_values<double>(t.name);
          p.merge_weight(w, t.shape);
          return w;
        });
      } else if (is_bias) {
        const module_plan& p = bp->second;
        add(t.name, t.shape, type, false, [&, module = bias_module](std::string& what) {
          what = "merged GLoRA bias b + b ⊙ D + E + W · C";
          return glora_part(module, p, false);
        });
      } else {
        add(t.name, t.shape, type, true, [&](std::string& what) {
          what = std::string("converted from ") + io::dtype_name(t.type);
          return base.load_values<double>(t.name);
        });
      }
    }
    for (const std::string& name : added) {
      const std::string module = module_of(name, bias_suffix);
      const module_plan& p = plan.modules.at(module);
      const io::dtype type = same_dtype ? base.info(module + weight_suffix).type : out_type;
      add(name, {p.out}, type, false, [&, module](std::string& what) {
        what = "added GLoRA bias E + W · C (the base layer has none)";
        return glora_part(module, p, false);
      });
    }
    writing = true;
    out.write(out_path);
    std::printf("merged %zu modules into %s (%zu tensors)\n", merged, out_path.c_str(), n);
    return 0;
  } catch (const merge_refused& e) {
    std::fprintf(stderr, "merge_adapter: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    // A loader reports every problem of a file, one per line.
    const std::string what = e.what();
    std::size_t start = 0, lines = 0;
    for (std::size_t end; (end = what.find('\n', start)) != std::string::npos; start = end + 1, ++lines)
      std::fprintf(stderr, "merge_adapter: %s\n", what.substr(start, end - start).c_str());
    std::fprintf(stderr, "merge_adapter: %s\n", what.substr(start).c_str());
    if (!writing) std::fprintf(stderr, "merge_adapter: %zu problem(s); nothing was written\n", lines + 1);
    return 1;
  }
}
