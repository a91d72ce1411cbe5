// PEFT LoRA adapters on disk, against files written by tests/reference/generate_peft_files.py from
// PyTorch tensors with the published layouts (tests/reference/peft/<case>/): loading gives PEFT's
// per-module rank, alpha and scaling (rank_pattern / alpha_pattern, rsLoRA, list and regex
// target_modules) and the ΔW PyTorch computes with PEFT's get_delta_weight; saving writes files that load
// back bit for bit (and, under ctest, that the generator's --check reads with PEFT's conventions);
// malformed adapters raise io::format_error naming the file, the module and the tensor.
//
// The hidden test case [.merge_adapter_output] checks the file examples/merge_adapter wrote (path in
// TA_MERGED_FILE) against PyTorch's merged weights; ctest runs it after the tool.
#include "reference.hpp"

#include <tensor_adapters/io/peft.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace ta = tensor_adapters;
namespace io = tensor_adapters::io;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const std::string peft_dir = std::string(TA_REFERENCE_DIR) + "/peft/";

struct case_info {
  const char* name;
  io::dtype stored;
  std::size_t modules;
};
const case_info cases[] = {{"lora_f32", io::dtype::F32, 8},
                           {"lora_f16", io::dtype::F16, 8},
                           {"lora_bf16", io::dtype::BF16, 8},
                           {"lora_f64_rslora", io::dtype::F64, 3}};

// ΔW of a loaded layer as a flat row-major vector.
template <class T>
std::vector<T> delta(const io::peft_lora_layer<T>& layer) {
  const ta::tensor<T, 2> dw = ta::delta_weight(layer.adapter);
  return std::vector<T>(dw.data(), dw.data() + dw.size());
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// A scratch copy of a reference adapter directory, to be broken by a test.
std::string scratch_copy(const std::string& case_name, const std::string& tag) {
  const fs::path dir = fs::path("peft_scratch") / tag;
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(peft_dir + case_name + "/" + f, dir / f);
  return dir.string();
}

// Rewrites a scratch adapter's tensor file, keeping every tensor `keep` accepts and adding `extra`.
template <class Keep, class Extra>
void rewrite_tensors(const std::string& dir, Keep keep, Extra extra) {
  const std::string path = dir + "/adapter_model.safetensors";
  const io::safetensors_file f = io::read_safetensors(path);
  io::safetensors_writer w;
  for (const auto& t : f.tensors())
    if (keep(t)) w.add_raw(t.name, t.type, t.shape, f.raw(t), static_cast<std::size_t>(t.end - t.begin));
  extra(w);
  w.write(path);
}

void require_load_error(const std::string& dir, const std::vector<std::string>& fragments) {
  try {
    io::load_peft_lora<double>(dir);
    FAIL("the adapter was accepted");
  } catch (const io::format_error& e) {
    const std::string what = e.what();
    for (const auto& f : fragments) CHECK_THAT(what, Contains(f));
  }
}

// A reference record of rank 1, 2 or 4 as a flat vector (and its shape, if asked).
std::vector<double> flat(const reference::file& ref, const std::string& key, std::size_t rank,
                         std::vector<ta::index>* shape = nullptr) {
  auto values = [&](const auto& t) {
    if (shape) shape->assign(t.dimensions().begin(), t.dimensions().end());
    std::vector<double> v(static_cast<std::size_t>(t.size()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = t.data()[i];
    return v;
  };
  if (rank == 1) return values(ref.get<double, 1>(key));
  if (rank == 2) return values(ref.get<double, 2>(key));
  REQUIRE(rank == 4);
  return values(ref.get<double, 4>(key));
}

}  // namespace

TEMPLATE_TEST_CASE("PEFT adapters written from PyTorch load with PEFT's ranks, scales and delta weights", "[peft]",
                   float, double) {
  using T = TestType;
  const reference::file ref("peft_lora.txt");
  for (const case_info& c : cases) {
    INFO("case " << c.name);
    const io::peft_lora_adapter<T> a = io::load_peft_lora<T>(peft_dir + c.name);
    REQUIRE(a.layers.size() == c.modules);
    for (const auto& [module, layer] : a.layers) {
      INFO("module " << module);
      const std::string key = std::string(c.name) + "/" + module + "/";
      REQUIRE(ref.has(key + "delta_weight"));
      CHECK(ta::rank(layer.adapter) == static_cast<ta::index>(ref.scalar(key + "rank")));
      CHECK(io::peft_rank(a.config, module) == static_cast<ta::index>(ref.scalar(key + "rank")));
      CHECK(io::peft_alpha(a.config, module) == ref.scalar(key + "alpha"));
      CHECK(static_cast<double>(layer.adapter.scale) ==
            Approx(ref.scalar(key + "scaling")).epsilon(4 * std::numeric_limits<T>::epsilon()));
      std::vector<ta::index> shape;
      const std::vector<double> want = flat(ref, key + "delta_weight", layer.weight_shape.size(), &shape);
      CHECK(layer.weight_shape == shape);
      const std::vector<T> got = delta(layer);
      REQUIRE(got.size() == want.size());
      double scale = 0;
      for (double v : want) scale = std::max(scale, std::abs(v));
      const double tol = 8 * std::numeric_limits<T>::epsilon() * static_cast<double>(ta::rank(layer.adapter)) * scale;
      for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(std::abs(static_cast<double>(got[i]) - want[i]) <= tol);
    }
  }
}

TEST_CASE("PEFT pattern and target rules", "[peft]") {
  CHECK(io::peft_pattern_matches("v_proj", "model.layers.0.self_attn.v_proj"));
  CHECK(io::peft_pattern_matches("v_proj", "v_proj"));
  CHECK_FALSE(io::peft_pattern_matches("proj", "model.v_proj"));      // only whole name components
  CHECK_FALSE(io::peft_pattern_matches("v_proj", "model.v_proj.x"));  // anchored at the end
  CHECK(io::peft_pattern_matches("layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"));
  CHECK_FALSE(io::peft_pattern_matches("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"));
  CHECK(io::peft_pattern_matches("layers\\.[0-3]\\..*_proj", "model.layers.2.mlp.up_proj"));  // a regex key

  io::peft_lora_config c;
  CHECK(io::peft_targets(c, "anything"));  // no target_modules: every module
  c.r = 8;
  c.lora_alpha = 16;
  c.rank_pattern = {{"q_proj", 4}, {"layers.0.self_attn.q_proj", 2}};
  c.alpha_pattern = {{"layers.0.self_attn.q_proj", 3.0}};
  CHECK(io::peft_rank(c, "model.layers.0.self_attn.q_proj") == 4);  // the first matching key wins
  CHECK(io::peft_alpha(c, "model.layers.0.self_attn.q_proj") == 3.0);
  CHECK(io::peft_rank(c, "model.layers.0.self_attn.k_proj") == 8);
  CHECK(io::peft_scale(c, "model.layers.0.self_attn.q_proj") == 0.75);
  c.use_rslora = true;
  CHECK(io::peft_scale(c, "model.layers.0.self_attn.k_proj") == Approx(16.0 / std::sqrt(8.0)));

  c.target_modules = {"q_proj", "model.conv1"};
  CHECK(io::peft_targets(c, "model.layers.0.self_attn.q_proj"));
  CHECK(io::peft_targets(c, "model.conv1"));
  CHECK_FALSE(io::peft_targets(c, "model.conv10"));
  CHECK_FALSE(io::peft_targets(c, "model.layers.0.self_attn.qq_proj"));
  c.target_modules_regex = ".*\\.(q|v)_proj";
  CHECK(io::peft_targets(c, "model.layers.0.self_attn.v_proj"));
  CHECK_FALSE(io::peft_targets(c, "model.conv1"));
  CHECK_FALSE(io::peft_targets(c, "v_proj"));  // the regex must match the whole name
}

TEST_CASE("PEFT adapters saved by the library load back bit for bit", "[peft]") {
  for (const case_info& c : cases) {
    INFO("case " << c.name);
    const io::peft_lora_adapter<double> a = io::load_peft_lora<double>(peft_dir + c.name);
    // Under ctest, generate_peft_files.py --check then reads these with PEFT's conventions.
    const std::string out = std::string("peft_saved/") + c.name;
    fs::remove_all(out);
    io::save_peft_lora(a, out, c.stored);
    const io::safetensors_file original = io::read_safetensors(peft_dir + c.name + "/adapter_model.safetensors");
    const io::safetensors_file saved = io::read_safetensors(out + "/adapter_model.safetensors");
    CHECK(saved.metadata().at("format") == "pt");
    REQUIRE(saved.tensors().size() == original.tensors().size());
    for (const auto& t : original.tensors()) {
      const io::tensor_info& u = saved.info(t.name);
      CHECK(u.type == t.type);
      CHECK(u.shape == t.shape);
      REQUIRE(u.end - u.begin == t.end - t.begin);
      CHECK(std::equal(saved.raw(u), saved.raw(u) + (u.end - u.begin), original.raw(t)));
    }
    const io::peft_lora_adapter<double> b = io::load_peft_lora<double>(out);
    REQUIRE(b.layers.size() == a.layers.size());
    for (const auto& [module, layer] : a.layers) {
      CHECK(b.layers.at(module).adapter.scale == layer.adapter.scale);
      CHECK(b.layers.at(module).weight_shape == layer.weight_shape);
    }
    const std::string json = read_text(out + "/adapter_config.json");
    CHECK_THAT(json, Contains("\"peft_type\": \"LORA\""));
    CHECK_THAT(json, Contains("\"use_rslora\": " + std::string(a.config.use_rslora ? "true" : "false")));
  }
}

TEST_CASE("PEFT adapters built in C++ save with rank and alpha patterns PEFT resolves", "[peft]") {
  std::mt19937_64 gen(11);
  io::peft_lora_adapter<float> a;
  a.config.r = 4;
  a.config.lora_alpha = 8;
  auto q = ta::make_lora<float>(6, 5, {4, 8.0}, gen);
  auto v = ta::make_lora<float>(6, 5, {2, 8.0}, gen);
  auto conv = ta::make_lora<float>(ta::shape<4>{3, 2, 3, 3}, {3, 8.0}, gen);
  for (auto* l : {&q, &v, &conv}) ta::fill_normal(l->B, 0.0, 0.5, gen);
  io::add_peft_lora_layer(a, "model.q_proj", q, {6, 5}, 8.0);
  io::add_peft_lora_layer(a, "model.v_proj", v, {6, 5}, 3.0);
  io::add_peft_lora_layer(a, "model.conv", conv, {3, 2, 3, 3}, 8.0);
  CHECK(a.config.target_modules == std::vector<std::string>{"model.q_proj", "model.v_proj", "model.conv"});
  CHECK(a.config.rank_pattern.size() == 2);
  CHECK(a.config.alpha_pattern.size() == 1);
  CHECK(a.layers.at("model.v_proj").adapter.scale == 1.5f);

  const std::string out = "peft_saved/built_in_cpp";
  fs::remove_all(out);
  io::save_peft_lora(a, out, io::dtype::BF16);
  const io::safetensors_file f = io::read_safetensors(out + "/adapter_model.safetensors");
  CHECK(f.info("base_model.model.model.conv.lora_A.weight").shape == std::vector<ta::index>{3, 2, 3, 3});
  CHECK(f.info("base_model.model.model.conv.lora_B.weight").shape == std::vector<ta::index>{3, 3, 1, 1});
  CHECK(f.info("base_model.model.model.q_proj.lora_B.weight").type == io::dtype::BF16);
  const auto b = io::load_peft_lora<float>(out);
  REQUIRE(b.layers.size() == 3);
  CHECK(b.layers.at("model.v_proj").adapter.scale == 1.5f);
  CHECK(b.layers.at("model.conv").adapter.scale == Approx(8.0f / 3.0f));
  CHECK(ta::rank(b.layers.at("model.conv").adapter) == 3);
  // BF16 rounding of the factors, and nothing else.
  const float a0 = a.layers.at("model.q_proj").adapter.A(1, 2);
  CHECK(b.layers.at("model.q_proj").adapter.A(1, 2) == static_cast<float>(Eigen::bfloat16(a0)));

  // A layer whose scale disagrees with the config is refused before anything is written.
  io::peft_lora_adapter<float> bad = a;
  bad.layers.at("model.q_proj").adapter.scale = 5.0f;
  fs::remove_all("peft_saved/refused");
  REQUIRE_THROWS_WITH(io::save_peft_lora(bad, "peft_saved/refused"), Contains("model.q_proj") && Contains("scale"));
  CHECK_FALSE(fs::exists("peft_saved/refused"));
  REQUIRE_THROWS_WITH(io::add_peft_lora_layer(bad, "model.k_proj", q, {6, 4}, 8.0), Contains("model.k_proj"));
}

TEST_CASE("malformed PEFT adapters raise clear errors", "[peft]") {
  const std::string q = "model.layers.0.self_attn.q_proj";
  const std::string qa = "base_model.model." + q + ".lora_A.weight", qb = "base_model.model." + q + ".lora_B.weight";

  SECTION("a factor is missing") {
    const std::string dir = scratch_copy("lora_f32", "missing_b");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qb; }, [](io::safetensors_writer&) {});
    require_load_error(dir, {"adapter_model.safetensors", q, qb, "no"});
  }
  SECTION("the rank disagrees with the config") {
    const std::string dir = scratch_copy("lora_f32", "rank");
    std::string json = read_text(dir + "/adapter_config.json");
    json.replace(json.find("\"v_proj\": 2"), 11, "\"v_proj\": 3");
    write_text(dir + "/adapter_config.json", json);
    require_load_error(dir, {"v_proj", "rank 2", "rank 3"});
  }
  SECTION("A and B disagree, or B is not (out, r, 1, 1)") {
    const std::string dir = scratch_copy("lora_f32", "shapes");
    rewrite_tensors(dir, [&](const io::tensor_info& t) { return t.name != qb; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 2> b(8, 3);
                      b.setZero();
                      w.add(qb, b);
                    });
    require_load_error(dir, {q, "disagree on the rank"});
    const std::string dir2 = scratch_copy("lora_f32", "conv_b");
    const std::string cb = "base_model.model.model.conv1.lora_B.weight";
    rewrite_tensors(dir2, [&](const io::tensor_info& t) { return t.name != cb; },
                    [&](io::safetensors_writer& w) {
                      ta::tensor<float, 4> b(6, 4, 1, 2);
                      b.setZero();
                      w.add(cb, b);
                    });
    require_load_error(dir2, {"model.conv1", cb, "(6, 4, 1, 2)"});
  }
  SECTION("keys PEFT LoRA does not write") {
    const std::string dir = scratch_copy("lora_f32", "unexpected");
    rewrite_tensors(dir, [](const io::tensor_info&) { return true; },
                    [](io::safetensors_writer& w) {
                      ta::tensor<float, 1> m(8);
                      m.setZero();
                      w.add("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", m);
                    });
    require_load_error(dir, {"lora_magnitude_vector", "not a PEFT LoRA factor"});
  }
  SECTION("a module target_modules does not select") {
    const std::string dir = scratch_copy("lora_f32", "untargeted");
    std::string json = read_text(dir + "/adapter_config.json");
    json.replace(json.find("\"down_proj\","), 12, "");
    write_text(dir + "/adapter_config.json", json);
    require_load_error(dir, {"model.layers.0.mlp.down_proj", "target_modules"});
  }
  SECTION("configs this reader refuses") {
    const std::string dir = scratch_copy("lora_f32", "config");
    const std::string good = read_text(dir + "/adapter_config.json");
    auto with = [&](const std::string& from, const std::string& to) {
      std::string json = good;
      json.replace(json.find(from), from.size(), to);
      write_text(dir + "/adapter_config.json", json);
    };
    with("\"use_dora\": false", "\"use_dora\": true");
    require_load_error(dir, {"adapter_config.json", "use_dora"});
    with("\"peft_type\": \"LORA\"", "\"peft_type\": \"LOHA\"");
    require_load_error(dir, {"peft_type", "LOHA"});
    with("\"r\": 4", "\"r\": 0");
    require_load_error(dir, {"\"r\""});
    with("\"r\": 4", "\"r\": 4, \"r\": 5");
    require_load_error(dir, {"\"r\" appears twice"});
    with("\"v_proj\": 2", "\"v_(proj\": 2");
    require_load_error(dir, {"rank_pattern", "v_(proj", "regular expression"});
    with("\"lora_alpha\": 8", "\"lora_alpha\": \"8\"");
    require_load_error(dir, {"lora_alpha"});
    write_text(dir + "/adapter_config.json", good.substr(0, good.size() / 2));
    require_load_error(dir, {"adapter_config.json", "invalid JSON"});
    write_text(dir + "/adapter_config.json", "{\"r\": 4, \"lora_alpha\": 8, \"x\": \"\xFF\"}");
    require_load_error(dir, {"UTF-8"});
  }
  SECTION("missing files") {
    require_load_error("peft_scratch/no_such_adapter", {"no_such_adapter", "adapter_config.json", "cannot open"});
    const std::string dir = scratch_copy("lora_f32", "no_tensors");
    fs::remove(dir + "/adapter_model.safetensors");
    require_load_error(dir, {"adapter_model.safetensors", "cannot open"});
  }
}

// Run by ctest after examples/merge_adapter: TA_MERGED_FILE is the file it wrote from
// peft/base_model.safetensors and peft/lora_f32.
TEST_CASE("merge_adapter output matches PyTorch's merged weights", "[.merge_adapter_output]") {
  const char* path = std::getenv("TA_MERGED_FILE");
  REQUIRE(path != nullptr);
  const io::safetensors_file merged = io::read_safetensors(path);
  const io::safetensors_file base = io::read_safetensors(peft_dir + "base_model.safetensors");
  const reference::file ref("peft_lora.txt");
  REQUIRE(merged.tensors().size() == base.tensors().size());
  std::size_t changed = 0;
  for (const auto& t : base.tensors()) {
    INFO("tensor " << t.name);
    const io::tensor_info& u = merged.info(t.name);
    CHECK(u.type == t.type);
    CHECK(u.shape == t.shape);
    if (!io::is_floating(t.type)) {  // copied byte for byte
      REQUIRE(u.end - u.begin == t.end - t.begin);
      CHECK(std::equal(merged.raw(u), merged.raw(u) + (u.end - u.begin), base.raw(t)));
      continue;
    }
    const std::vector<double> got = merged.load_values<double>(t.name);
    const std::string key = "merged/lora_f32/" + t.name;
    REQUIRE(ref.has(key));
    const std::vector<double> want = flat(ref, key, t.shape.size());
    REQUIRE(got.size() == want.size());
    const std::vector<double> before = base.load_values<double>(t.name);
    bool differs = false;
    for (std::size_t i = 0; i < got.size(); ++i) {
      // One rounding of the float64 sum to F32.
      REQUIRE(std::abs(got[i] - want[i]) <= std::abs(want[i]) * std::ldexp(1.0, -24) * 1.0000001);
      differs = differs || got[i] != before[i];
    }
    changed += differs;
  }
  CHECK(changed == 8);
}
