// merge_adapter: folds a PEFT LoRA adapter into base weights.
//
//   merge_adapter <base.safetensors> <adapter directory> <merged.safetensors> [--dtype same|F64|F32|F16|BF16]
//
// The adapter directory holds PEFT's adapter_config.json and adapter_model.safetensors. For every adapted
// module <m>, the base tensor "<m>.weight" becomes W + ΔW, ΔW = scale · reshape(B · A, W.shape), computed
// and accumulated in float64 and rounded once to the output dtype (by default each tensor's own dtype).
// Every other tensor is copied unchanged (byte for byte unless --dtype converts it). __metadata__ is kept.
//
// Nothing is written unless every check passes: each adapted module has a floating-point base weight of
// the shape its factors imply; each base weight of a module target_modules selects has factors; every
// merged value is finite and representable in the output dtype. Each problem is reported on its own line
// naming the tensor. One progress line per tensor goes to stdout. Exit status: 0 on success, 1 on a
// problem with the files, 2 on bad usage.
#include <tensor_adapters/io/peft.hpp>
#include <tensor_adapters/io/safetensors.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <vector>

namespace ta = tensor_adapters;
namespace io = tensor_adapters::io;

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: merge_adapter <base.safetensors> <adapter directory> <merged.safetensors> "
               "[--dtype same|F64|F32|F16|BF16]\n");
  return 2;
}

std::string shape_text(const std::vector<ta::index>& s) {
  std::string t = "(";
  for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + ")";
}

const std::string weight_suffix = ".weight";

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 6) return usage();
  const std::string base_path = argv[1], adapter_dir = argv[2], out_path = argv[3];
  bool same_dtype = true;
  io::dtype out_type = io::dtype::F32;
  if (argc == 6) {
    const std::string flag = argv[4], value = argv[5];
    if (flag != "--dtype") return usage();
    if (value != "same") {
      if (!io::parse_dtype(value, out_type) || !io::is_floating(out_type)) return usage();
      same_dtype = false;
    }
  }

  try {
    const io::safetensors_file base = io::read_safetensors(base_path);
    const io::peft_lora_adapter<double> adapter = io::load_peft_lora<double>(adapter_dir);
    std::printf("base %s: %zu tensors; adapter %s: %zu LoRA modules (r %ld, lora_alpha %g%s)\n", base_path.c_str(),
                base.tensors().size(), adapter_dir.c_str(), adapter.layers.size(),
                static_cast<long>(adapter.config.r), adapter.config.lora_alpha,
                adapter.config.use_rslora ? ", rsLoRA" : "");

    // Every check before any output.
    std::vector<std::string> problems;
    for (const auto& [module, layer] : adapter.layers) {
      const std::string name = module + weight_suffix;
      if (!base.contains(name)) {
        problems.push_back("the base weights have no tensor \"" + name + "\" for the adapted module \"" + module + "\"");
        continue;
      }
      const io::tensor_info& t = base.info(name);
      if (!io::is_floating(t.type))
        problems.push_back("base tensor \"" + name + "\" has dtype " + io::dtype_name(t.type) +
                           ", which cannot take a LoRA update");
      else if (t.shape != layer.weight_shape)
        problems.push_back("base tensor \"" + name + "\" has shape " + shape_text(t.shape) + " but the adapter's " +
                           "factors for \"" + module + "\" (lora_A " + ta::detail::shape_string(layer.adapter.A) +
                           ", lora_B " + ta::detail::shape_string(layer.adapter.B) + ") need " +
                           shape_text(layer.weight_shape));
    }
    const bool targets_unknown = adapter.config.target_modules_regex == "all-linear" ||
                            (adapter.config.target_modules.empty() && adapter.config.target_modules_regex.empty());
    for (const io::tensor_info& t : base.tensors()) {
      if (targets_unknown || t.shape.size() < 2 || !io::is_floating(t.type) || t.name.size() <= weight_suffix.size() ||
          t.name.compare(t.name.size() - weight_suffix.size(), weight_suffix.size(), weight_suffix) != 0)
        continue;
      const std::string module = t.name.substr(0, t.name.size() - weight_suffix.size());
      if (io::peft_targets(adapter.config, module) && adapter.layers.count(module) == 0)
        problems.push_back("adapter_config.json's target_modules selects \"" + module +
                           "\" but the adapter has no lora_A / lora_B tensors for it");
    }
    if (!problems.empty()) {
      for (const std::string& p : problems) std::fprintf(stderr, "merge_adapter: %s\n", p.c_str());
      std::fprintf(stderr, "merge_adapter: %zu problem(s); nothing was written\n", problems.size());
      return 1;
    }

    io::safetensors_writer out;
    for (const auto& [key, value] : base.metadata()) out.set_metadata(key, value);
    const std::size_t n = base.tensors().size();
    std::size_t i = 0, merged = 0;
    for (const io::tensor_info& t : base.tensors()) {
      ++i;
      const io::dtype type = same_dtype || !io::is_floating(t.type) ? t.type : out_type;
      const std::string module = t.name.size() > weight_suffix.size()
                                     ? t.name.substr(0, t.name.size() - weight_suffix.size())
                                     : std::string();
      auto layer = adapter.layers.end();
      if (t.name.size() > weight_suffix.size() &&
          t.name.compare(t.name.size() - weight_suffix.size(), weight_suffix.size(), weight_suffix) == 0)
        layer = adapter.layers.find(module);

      if (layer == adapter.layers.end() && type == t.type) {
        out.add_raw(t.name, t.type, t.shape, base.raw(t), static_cast<std::size_t>(t.end - t.begin));
        std::printf("[%zu/%zu] %s %s %s: copied\n", i, n, t.name.c_str(), shape_text(t.shape).c_str(),
                    io::dtype_name(t.type));
        continue;
      }
      std::vector<double> w = base.load_values<double>(t.name);
      if (layer != adapter.layers.end()) {
        const ta::lora<double>& a = layer->second.adapter;
        ta::tensor_view<double, 2> view(w.data(), a.B.dimension(0), a.A.dimension(1));
        try {
          ta::safe_merge<double, 2>(a, view);  // float64 accumulation; throws on a non-finite result
        } catch (const ta::argument_error& e) {
          std::fprintf(stderr, "merge_adapter: tensor \"%s\": %s; nothing was written\n", t.name.c_str(), e.what());
          return 1;
        }
      }
      for (std::size_t k = 0; k < w.size(); ++k) {
        if (!std::isfinite(io::stored_value(w[k], type))) {
          std::fprintf(stderr,
                       "merge_adapter: tensor \"%s\": element %zu (%g) is not finite in %s; nothing was written\n",
                       t.name.c_str(), k, w[k], io::dtype_name(type));
          return 1;
        }
      }
      out.add_values(t.name, w.data(), t.shape, type);
      if (layer != adapter.layers.end()) {
        ++merged;
        std::printf("[%zu/%zu] %s %s %s: merged LoRA rank %ld, scale %g\n", i, n, t.name.c_str(),
                    shape_text(t.shape).c_str(), io::dtype_name(type),
                    static_cast<long>(ta::rank(layer->second.adapter)), layer->second.adapter.scale);
      } else {
        std::printf("[%zu/%zu] %s %s %s: converted from %s\n", i, n, t.name.c_str(), shape_text(t.shape).c_str(),
                    io::dtype_name(type), io::dtype_name(t.type));
      }
    }
    out.write(out_path);
    std::printf("merged %zu LoRA modules into %s (%zu tensors)\n", merged, out_path.c_str(), n);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "merge_adapter: %s\n", e.what());
    return 1;
  }
}
